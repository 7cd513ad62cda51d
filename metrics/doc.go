// Package metrics turns the events of qmigrate migrations into Prometheus
// metrics. It is optional: the engine does not import it, and it is the only
// qmigrate package that imports the Prometheus client library.
//
// A manager creates one Collector, registers it in its own registry (the
// global registry is never touched) and gives each migration's events to
// the function Observe returns for the migration's name:
//
//	reg := prometheus.NewRegistry()
//	mc := metrics.New(metrics.Options{})
//	reg.MustRegister(mc)
//	http.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
//	cfg.Observer = mc.Observe("vm1") // or call it with each event of a job
//
// # Series
//
// Per migration, labelled name (the manager's name for it), as of its
// latest event:
//
//	qmigrate_migration_phase{name,phase}              1 for the current phase
//	qmigrate_migration_start_time_seconds{name}       Unix time it started
//	qmigrate_migration_data_processed_bytes{name}     RAM bytes sent
//	qmigrate_migration_data_remaining_bytes{name}     RAM bytes left in this pass
//	qmigrate_migration_data_total_bytes{name}         the guest's RAM size
//	qmigrate_migration_dirty_memory_rate_bytes{name}  QEMU's dirty rate, bytes/s
//	qmigrate_migration_guest_dirty_rate_bytes{name}   the guest's own (calc-dirty-rate), once measured
//	qmigrate_migration_memory_transfer_rate_bytes{name} RAM throughput, bytes/s
//	qmigrate_migration_iteration{name}                the pass (dirty-sync-count)
//	qmigrate_migration_expected_downtime_seconds{name}
//	qmigrate_migration_downtime_limit_seconds{name}
//	qmigrate_migration_cpu_throttle_percent{name}     auto-converge throttle
//	qmigrate_migration_disk_remaining_bytes{name}     storage migrations only
//	qmigrate_migration_disk_total_bytes{name}         storage migrations only
//	qmigrate_migration_disk_transfer_rate_bytes{name} mirror rate before the RAM phase
//	qmigrate_migration_decisions_total{name,action}   strategy decisions
//
// Across migrations (these survive a migration's end):
//
//	qmigrate_migrations_in_phase{phase}               running migrations per phase
//	qmigrate_decisions_total{action}                  decisions of all migrations
//	qmigrate_decision_errors_total{action}            decisions that failed to apply
//	qmigrate_migrations_total{status}                 finished: completed, failed, cancelled
//	qmigrate_migrations_state_unknown_total           finished with the guest's side unknown
//	qmigrate_migration_duration_seconds{status}       histogram of wall time
//	qmigrate_migration_downtime_seconds               histogram of completed migrations' downtime
//
// # KubeVirt correspondence
//
// Where a series means what one of KubeVirt's migration metrics means, it
// has the same name with qmigrate_ for kubevirt_vmi_ (KubeVirt labels by
// namespace and name; here name only, plus Options.ConstLabels):
//
//	qmigrate_migration_data_processed_bytes       kubevirt_vmi_migration_data_processed_bytes
//	qmigrate_migration_data_remaining_bytes       kubevirt_vmi_migration_data_remaining_bytes
//	qmigrate_migration_data_total_bytes           kubevirt_vmi_migration_data_total_bytes
//	qmigrate_migration_dirty_memory_rate_bytes    kubevirt_vmi_migration_dirty_memory_rate_bytes
//	qmigrate_migration_memory_transfer_rate_bytes kubevirt_vmi_migration_memory_transfer_rate_bytes
//	                                              (kubevirt_vmi_migration_disk_transfer_rate_bytes
//	                                              in KubeVirt releases that named the memory rate so)
//	qmigrate_migration_disk_transfer_rate_bytes   kubevirt_vmi_migration_disk_transfer_rate_bytes
//	                                              (as documented now: the disks' rate)
//	qmigrate_migration_start_time_seconds         kubevirt_vmi_migration_start_time_seconds
//	qmigrate_migrations_in_phase{phase}           kubevirt_vmi_migrations_in_{pending,scheduling,running}_phase,
//	                                              one gauge with a label: qmigrate's phases are prepare,
//	                                              start, converge, switchover, complete and rollback
//	qmigrate_migrations_total{status}             kubevirt_vmi_migration_succeeded and
//	                                              kubevirt_vmi_migration_failed (counted per status here)
//	qmigrate_migration_duration_seconds           kubevirt_vmi_migration_phase_transition_time_from_creation_seconds
//	                                              (from start to the end only)
//
// The rest (phase, iteration, expected downtime, downtime limit, throttle,
// decisions, downtime histogram) have no KubeVirt counterpart: KubeVirt
// leaves the switchover to libvirt and does not expose it.
//
// QEMU's dirty rate saturates at about the transfer rate (it counts pages
// dirtied between passes); qmigrate_migration_guest_dirty_rate_bytes is the
// guest's rate measured apart, present when the policy measured it.
//
// # Lifetime of series
//
// When a migration's result event arrives its per-migration series (those
// labelled name) are removed, so a manager that runs migrations for months
// does not accumulate series; what it did stays in the counters and
// histograms across migrations. Options.KeepFinished keeps them until
// Forget(name) instead (the phase series then reads complete or rollback).
// Two observers of the same name at once share its series, which are
// removed when the last of them finishes.
package metrics
