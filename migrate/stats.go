package migrate

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	criustats "github.com/checkpoint-restore/go-criu/v7/stats"
)

// DumpStats is CRIU's stats-dump for one dump or pre-dump. CRIU counts
// times in microseconds; they are Durations here.
type DumpStats struct {
	FreezingTime       time.Duration // freezing the tree
	FrozenTime         time.Duration // how long the tree stayed frozen
	MemdumpTime        time.Duration // collecting pages (while frozen)
	MemwriteTime       time.Duration // writing pages out
	PagesScanned       uint64
	PagesSkippedParent uint64 // left out because the parent images had them
	PagesWritten       uint64
	PagesLazy          uint64 // left for post-copy to fetch on fault
}

// RestoreStats is CRIU's stats-restore.
type RestoreStats struct {
	ForkingTime     time.Duration
	RestoreTime     time.Duration
	PagesCompared   uint64
	PagesSkippedCow uint64
	PagesRestored   uint64
}

// ReadDumpStats reads imagesDir/stats-dump, which CRIU writes after every
// dump and pre-dump. (In post-copy it says little: lazy pages are counted,
// not moved.)
func ReadDumpStats(imagesDir string) (*DumpStats, error) {
	var s *criustats.DumpStatsEntry
	err := readStats(imagesDir, criustats.StatsDump, func(dir *os.File) (err error) {
		s, err = criustats.CriuGetDumpStats(dir)
		if err == nil && s == nil {
			err = fmt.Errorf("no dump entry: %w", ErrMalformedStats)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return &DumpStats{
		FreezingTime:       usec(s.GetFreezingTime()),
		FrozenTime:         usec(s.GetFrozenTime()),
		MemdumpTime:        usec(s.GetMemdumpTime()),
		MemwriteTime:       usec(s.GetMemwriteTime()),
		PagesScanned:       s.GetPagesScanned(),
		PagesSkippedParent: s.GetPagesSkippedParent(),
		PagesWritten:       s.GetPagesWritten(),
		PagesLazy:          s.GetPagesLazy(),
	}, nil
}

// ReadRestoreStats reads imagesDir/stats-restore, which CRIU writes after a
// restore.
func ReadRestoreStats(imagesDir string) (*RestoreStats, error) {
	var s *criustats.RestoreStatsEntry
	err := readStats(imagesDir, criustats.StatsRestore, func(dir *os.File) (err error) {
		s, err = criustats.CriuGetRestoreStats(dir)
		if err == nil && s == nil {
			err = fmt.Errorf("no restore entry: %w", ErrMalformedStats)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return &RestoreStats{
		ForkingTime:     usec(s.GetForkingTime()),
		RestoreTime:     usec(s.GetRestoreTime()),
		PagesCompared:   s.GetPagesCompared(),
		PagesSkippedCow: s.GetPagesSkippedCow(),
		PagesRestored:   s.GetPagesRestored(),
	}, nil
}

// Round makes the convergence input of a pre-dump from its stats and
// ferry's measurements of the round.
func (s *DumpStats) Round(started time.Time, bytesSent int64, transfer time.Duration) Round {
	return Round{
		PagesWritten:       s.PagesWritten,
		PagesSkippedParent: s.PagesSkippedParent,
		FrozenTime:         s.FrozenTime,
		MemdumpTime:        s.MemdumpTime,
		MemwriteTime:       s.MemwriteTime,
		Started:            started,
		BytesSent:          bytesSent,
		TransferTime:       transfer,
	}
}

// CheckParentUsed is for a dump that was given parent images (a pre-dump
// after the first, or the final dump of a pre-copy): CRIU does not fail
// when it cannot use the parent, it logs "No parent image found, though
// parent directory is set" and writes every page. A dump that scanned pages
// and skipped none because of the parent gets ErrParentIgnored. (A workload
// that dirtied every page since the last round would too; it is not
// converging either way.)
func (s *DumpStats) CheckParentUsed() error {
	if s.PagesScanned > 0 && s.PagesSkippedParent == 0 {
		return fmt.Errorf("migrate: dump scanned %d pages, wrote %d, skipped none for the parent: %w",
			s.PagesScanned, s.PagesWritten, ErrParentIgnored)
	}
	return nil
}

func usec(v uint32) time.Duration { return time.Duration(v) * time.Microsecond }

// readStats checks the file's framing before go-criu reads it: go-criu
// slices the buffer by the sizes the file claims and would panic on a
// short or truncated file.
func readStats(imagesDir, name string, read func(*os.File) error) (retErr error) {
	path := filepath.Join(imagesDir, name)
	fail := func(err error) error { return &StatsError{Path: path, Err: err} }

	b, err := os.ReadFile(path)
	if err != nil {
		return fail(err)
	}
	if err := checkStatsFraming(b); err != nil {
		return fail(err)
	}
	// go-criu joins the file name with dir.Name(), so the path it was
	// opened by is what counts, not the descriptor.
	dir, err := os.Open(imagesDir)
	if err != nil {
		return fail(err)
	}
	defer func() {
		if err := dir.Close(); err != nil && retErr == nil {
			retErr = fail(err)
		}
	}()
	defer func() {
		// The file could change between the check and go-criu's read.
		if p := recover(); p != nil {
			retErr = fail(fmt.Errorf("go-criu: %v: %w", p, ErrMalformedStats))
		}
	}()
	if err := read(dir); err != nil {
		if errors.Is(err, ErrMalformedStats) {
			return fail(err)
		}
		return fail(fmt.Errorf("%w: %w", ErrMalformedStats, err))
	}
	return nil
}

func checkStatsFraming(b []byte) error {
	if len(b) < criustats.PayloadOffset {
		return fmt.Errorf("%d bytes, shorter than the %d-byte header: %w", len(b), criustats.PayloadOffset, ErrMalformedStats)
	}
	if m := binary.LittleEndian.Uint32(b[criustats.PrimaryMagicOffset:]); m != criustats.ImgServiceMagic {
		return fmt.Errorf("primary magic %#x, want %#x: %w", m, criustats.ImgServiceMagic, ErrMalformedStats)
	}
	if m := binary.LittleEndian.Uint32(b[criustats.SecondaryMagicOffset:]); m != criustats.StatsMagic {
		return fmt.Errorf("secondary magic %#x, want %#x: %w", m, criustats.StatsMagic, ErrMalformedStats)
	}
	if size := binary.LittleEndian.Uint32(b[criustats.SizeOffset:]); uint64(size) > uint64(len(b)-criustats.PayloadOffset) {
		return fmt.Errorf("payload of %d bytes claimed, %d present: %w", size, len(b)-criustats.PayloadOffset, ErrMalformedStats)
	}
	return nil
}
