// Package netsetup owns a node's container networking: the host bridge, one
// network namespace per container (bind-mounted at RunDir/netns/<id> so it
// outlives processes and can be handed to a restore), the veth pair that
// joins it to the bridge, the container's address from the node's IPAM,
// published ports, and the gratuitous ARP that moves an address to another
// node during a migration.
//
// Addressing: the hosts on one L2 segment share its subnet and allocate
// from disjoint slices of it (each node's ip-range); each node's gateway is
// its own (by default the first address of its slice). A container's MAC is
// derived from its IPv4 address (MACFor: 02:42 and the four address bytes),
// so it moves with the address and neighbours' ARP entries stay right; only
// the bridges' forwarding tables must learn the new port, which Announce
// makes happen at once.
//
// How the agent uses it:
//
//	ferryd start:  New(cfg), then Reconcile(ctx, liveIDs) before serving.
//	run:           Setup(ctx, id, SetupOptions{IP: pin, Ports: ...}) before
//	               creating the container in Endpoint.NetnsPath; rm:
//	               Teardown(ctx, id) after the container is gone.
//	migration:     destination Setup(ctx, id, {IP: source's IP, Standby: true})
//	               while preparing; source Deactivate(ctx, id) right after the
//	               final dump; destination Activate(ctx, id) right after the
//	               restore; after the destination confirms, source
//	               TeardownMoved(ctx, id, peer). Rollback: destination
//	               Teardown, source Activate.
//
// The package works in one "host" network namespace (the process's own, or
// Config.HostNetns) and in the namespaces it creates. It must not add
// routes, masquerading or forwarding towards the outside, nor switch
// ip_forward; it touches no link it did not create besides the configured
// bridge, and in iptables only its own chains (FERRY-PORTS: published
// ports' DNAT; FERRY-FORWARD: lets those DNATed flows through) and one jump
// into each. It never starts or stops container processes.
package netsetup
