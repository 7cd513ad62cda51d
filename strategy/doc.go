// Package strategy is the switchover brain of qmigrate: a pure, deterministic
// state machine in the style of etcd-raft's RawNode. Samples go in, decisions
// come out; time is passed in as data (Sample.Elapsed). There is no clock, no
// I/O and no goroutine, and the same inputs always give the same decisions.
package strategy
