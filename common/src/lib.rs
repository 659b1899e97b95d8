//! Types both sides of Dormant share: validated names, resource quantities, tenant and node
//! states, config-file loading, logging set-up and the systemd notify protocol.

#![forbid(unsafe_code)]

pub mod config;
pub mod engine_access;
pub mod hibernation;
pub mod metrics_http;
pub mod name;
pub mod quantity;
pub mod resources;
pub mod sd_notify;
pub mod state;
pub mod telemetry;
pub mod text;
pub mod tls;
pub mod uid;

pub use engine_access::{EngineAccess, EngineAccessError};
pub use name::{NameError, NodeName, TenantName};
pub use quantity::{Bytes, MilliCpu, QuantityError};
pub use resources::Resources;
pub use state::{DesiredState, NodeStatus, TenantState};
pub use uid::TenantUid;
