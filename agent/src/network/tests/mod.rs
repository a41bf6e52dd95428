//! The network module's tests: `proto` (pure) and `apply` (against the real
//! kernel, in network namespaces of their own).

mod apply;
mod proto;
