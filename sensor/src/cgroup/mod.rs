//! Cgroups: where the hierarchies are mounted, workload attribution from a cgroup path
//! (container id, pod uid; names from the runtimes through `workloads`), best-effort reads of
//! memory limits, and bounded workload label sets.
//!
//! `hierarchies` (mounts, the walk), `identity` (workload and labels from a path), `set` (the
//! bounded set), `registry` (the rescan: ids, paths, labels), `retirement` (when vanished ids
//! are forgotten).

mod hierarchies;
mod identity;
mod registry;
mod retirement;
mod set;

pub use hierarchies::{read_activity, walk, Hierarchies};
pub(crate) use identity::render_labels;
pub use identity::{with_names, workload, workload_labels_from, Workload, WorkloadLabels, OTHER, WORKLOAD_LABELS};
pub use registry::Discovery;
pub use set::WorkloadSet;
