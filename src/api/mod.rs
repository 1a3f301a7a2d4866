//! The public contract of the control plane: the `Route` custom resource and its status conditions.

mod conditions;
mod guardrail;
mod mcp;
mod route;
mod team;

pub use conditions::{Outcome, Reason, condition, ready_condition};
pub use guardrail::{
    Builtin, Detector, FailureMode, GuardrailAction, GuardrailCheck, GuardrailPhase,
    GuardrailPolicy, GuardrailPolicySpec, GuardrailPolicyStatus, JudgeDetector, StreamMode,
    WebhookDetector,
};
pub use mcp::{
    McpAccessRule, McpCredential, McpLimit, McpOAuth, McpServer, McpServerSpec, McpServerStatus,
    McpTransport, ToolFilter,
};
pub use route::{
    AccessRule, BackendSpec, BackendStatus, CacheScope, CacheSpec, DEFAULT_SECRET_KEY, Limit,
    LimitAction, LimitKey, ModelSpec, OnExceed, OutlierDetection, PoolRef, Pricing, Provider,
    RenewalPeriod, RetryOn, RetryPolicy, Route, RouteSpec, RouteStatus, RouteType, Saturation,
    SecretKeyRef, SemanticSpec, ServiceRef, parse_duration,
};
pub use team::{Team, TeamSpec, TeamStatus};
