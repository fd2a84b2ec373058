// Package pki makes the certificates of a small ferry cluster: one cluster
// CA, and per node (or controller) a certificate that serves as both TLS
// server and client identity, so every peer and controller authenticates
// with mutual TLS. It writes the files a node's --tls-dir takes.
package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"time"

	"github.com/ferry-agent/ferry/internal/atomicfile"
)

// File names in a --tls-dir.
const (
	CAFile      = "ca.pem"
	CertFile    = "node.pem"
	KeyFile     = "node-key.pem"
	caKeyFile   = "ca-key.pem"
	caValidity  = 10 * 365 * 24 * time.Hour
	crtValidity = 2 * 365 * 24 * time.Hour
)

// ErrInvalid classes bad input (a node name, a SAN).
var ErrInvalid = errors.New("invalid certificate request")

var nodeRE = regexp.MustCompile(`^[a-z0-9][a-z0-9.-]{0,62}$`)

// CA is a loaded or created cluster CA.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
	PEM  []byte
}

// LoadOrCreateCA loads DIR/ca.pem and DIR/ca-key.pem, creating them if neither exists.
func LoadOrCreateCA(dir string, now time.Time) (*CA, bool, error) {
	certPath, keyPath := filepath.Join(dir, CAFile), filepath.Join(dir, caKeyFile)
	if _, err := os.Stat(certPath); err == nil {
		ca, err := loadCA(certPath, keyPath)
		return ca, false, err
	}
	if _, err := os.Stat(keyPath); err == nil {
		return nil, false, fmt.Errorf("ca: %s exists without %s: %w", keyPath, certPath, ErrInvalid)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, false, fmt.Errorf("ca: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, false, fmt.Errorf("ca: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "ferry cluster CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(caValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, false, fmt.Errorf("ca: %w", err)
	}
	if err := writeKey(keyPath, key); err != nil {
		return nil, false, err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := atomicfile.Write(certPath, certPEM, 0o644); err != nil {
		return nil, false, fmt.Errorf("ca: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, false, fmt.Errorf("ca: %w", err)
	}
	return &CA{Cert: cert, Key: key, PEM: certPEM}, true, nil
}

func loadCA(certPath, keyPath string) (*CA, error) {
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	b, _ := pem.Decode(certPEM)
	if b == nil {
		return nil, fmt.Errorf("ca: %s holds no PEM certificate: %w", certPath, ErrInvalid)
	}
	cert, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", certPath, err)
	}
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	kb, _ := pem.Decode(keyPEM)
	if kb == nil {
		return nil, fmt.Errorf("ca: %s holds no PEM key: %w", keyPath, ErrInvalid)
	}
	key, err := x509.ParseECPrivateKey(kb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", keyPath, err)
	}
	return &CA{Cert: cert, Key: key, PEM: certPEM}, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	if err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return n
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return fmt.Errorf("key %s: %w", path, err)
	}
	return atomicfile.Write(path, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600)
}

// IssueNode writes DIR/NAME/{ca.pem,node.pem,node-key.pem}: a certificate for
// name, valid as TLS server and client, with name, localhost, the loopback
// addresses and sans (IP addresses or DNS names) as subject alternative names.
func (ca *CA) IssueNode(dir, name string, sans []string, validity time.Duration, now time.Time) (string, error) {
	if !nodeRE.MatchString(name) {
		return "", fmt.Errorf("node %q: must match %s: %w", name, nodeRE, ErrInvalid)
	}
	if validity <= 0 {
		validity = crtValidity
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: name, Organization: []string{"ferry"}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(validity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     []string{name, "localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	for _, s := range sans {
		if ip := net.ParseIP(s); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if nodeRE.MatchString(s) {
			tmpl.DNSNames = append(tmpl.DNSNames, s)
		} else {
			return "", fmt.Errorf("node %q: san %q: not an IP address or DNS name: %w", name, s, ErrInvalid)
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", err
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return "", fmt.Errorf("node %q: %w", name, err)
	}
	out := filepath.Join(dir, name)
	if err := os.MkdirAll(out, 0o700); err != nil {
		return "", err
	}
	if err := writeKey(filepath.Join(out, KeyFile), key); err != nil {
		return "", err
	}
	if err := atomicfile.Write(filepath.Join(out, CertFile), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return "", err
	}
	if err := atomicfile.Write(filepath.Join(out, CAFile), ca.PEM, 0o644); err != nil {
		return "", err
	}
	return out, nil
}
