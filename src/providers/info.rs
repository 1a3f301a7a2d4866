//! Every fixed fact about a provider, one row each: what it serves, which Secret keys it reads,
//! where it lives by default, and what the surfaces must know about it. Adapters hold behaviour
//! only; a new provider is a new row here, and a fact a surface needs is a column, so no surface
//! keeps its own list of providers that a new one would silently miss.

use super::{ALL_ROUTE_TYPES, CredentialKeys};
use crate::api::{Provider, RouteType};

/// An API spoken both by surfaces and by providers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// OpenAI's chat completions, completions and embeddings.
    OpenAi,
    /// Anthropic Messages.
    Anthropic,
}

pub struct ProviderInfo {
    pub provider: Provider,
    /// Route types this provider can serve.
    pub route_types: &'static [RouteType],
    pub credential_keys: CredentialKeys,
    /// Used when the Route has no `apiBase`; `None` makes `apiBase` required.
    pub default_api_base: Option<&'static str>,
    /// The adapter sends the unified request's `top_k` (the Messages surface passes a caller's
    /// `top_k` on only when every backend of the Route does).
    pub reads_top_k: bool,
    /// The API the provider's own wire speaks, when a surface speaks it too: a call on that
    /// surface to a Route whose backends all speak it passes through untranslated.
    pub wire: Option<Wire>,
    /// The provider takes OpenAI's `stream_options` and, asked, ends a stream with a usage chunk
    /// of its own; those that reject it report usage their own way, so their streams are
    /// translated into OpenAI's shape rather than passed through.
    pub stream_options: bool,
    /// MLflow 2.5 took `temperature` on 0-1 and multiplied it by this before sending it.
    pub mlflow25_temperature_scale: f64,
    /// The name MLflow 2.5's listing shows: its client knew four providers and refuses any other
    /// word, so the others are listed as `openai`, whose API shape the gateway presents anyway.
    pub mlflow25_listed_as: &'static str,
}

/// Azure: the Secret key holding an Entra ID access token instead of a resource key.
pub const AZURE_AD_TOKEN: &str = "azureAdToken";
/// Bedrock: the AWS credentials' Secret keys.
pub const ACCESS_KEY_ID: &str = "awsAccessKeyId";
pub const SECRET_ACCESS_KEY: &str = "awsSecretAccessKey";
pub const SESSION_TOKEN: &str = "awsSessionToken";
/// Bedrock's base URL; `{region}` is filled from `config.region`.
pub const BEDROCK_API_BASE: &str = "https://bedrock-runtime.{region}.amazonaws.com";

const CHAT: &[RouteType] = &[RouteType::Chat];
const CHAT_EMBEDDINGS: &[RouteType] = &[RouteType::Chat, RouteType::Embeddings];

/// An API-key provider serving every route type; rows override what differs.
const DEFAULTS: ProviderInfo = ProviderInfo {
    provider: Provider::OpenaiCompatible,
    route_types: ALL_ROUTE_TYPES,
    credential_keys: CredentialKeys::ApiKey { required: true },
    default_api_base: None,
    reads_top_k: false,
    wire: Some(Wire::OpenAi),
    stream_options: true,
    mlflow25_temperature_scale: 2.0,
    mlflow25_listed_as: "openai",
};

pub static OPENAI: ProviderInfo = ProviderInfo {
    provider: Provider::Openai,
    default_api_base: Some("https://api.openai.com/v1"),
    ..DEFAULTS
};

pub static AZURE_OPENAI: ProviderInfo = ProviderInfo {
    provider: Provider::AzureOpenai,
    credential_keys: CredentialKeys::ApiKeyOr {
        alternatives: &[AZURE_AD_TOKEN],
    },
    // Every Azure resource has its own host.
    default_api_base: None,
    ..DEFAULTS
};

pub static ANTHROPIC: ProviderInfo = ProviderInfo {
    provider: Provider::Anthropic,
    wire: Some(Wire::Anthropic),
    route_types: CHAT,
    default_api_base: Some("https://api.anthropic.com"),
    reads_top_k: true,
    mlflow25_temperature_scale: 1.0,
    mlflow25_listed_as: "anthropic",
    ..DEFAULTS
};

pub static COHERE: ProviderInfo = ProviderInfo {
    provider: Provider::Cohere,
    wire: None,
    default_api_base: Some("https://api.cohere.com"),
    mlflow25_temperature_scale: 5.0,
    mlflow25_listed_as: "cohere",
    ..DEFAULTS
};

pub static GEMINI: ProviderInfo = ProviderInfo {
    provider: Provider::Gemini,
    wire: None,
    default_api_base: Some("https://generativelanguage.googleapis.com"),
    reads_top_k: true,
    ..DEFAULTS
};

pub static BEDROCK: ProviderInfo = ProviderInfo {
    provider: Provider::Bedrock,
    wire: None,
    credential_keys: CredentialKeys::Named {
        required: &[ACCESS_KEY_ID, SECRET_ACCESS_KEY],
        optional: &[SESSION_TOKEN],
    },
    default_api_base: Some(BEDROCK_API_BASE),
    reads_top_k: true,
    mlflow25_temperature_scale: 1.0,
    ..DEFAULTS
};

pub static HUGGINGFACE_TGI: ProviderInfo = ProviderInfo {
    provider: Provider::HuggingfaceTgi,
    wire: None,
    route_types: &[RouteType::Completions],
    credential_keys: CredentialKeys::ApiKey { required: false },
    // TGI runs wherever it was deployed.
    default_api_base: None,
    reads_top_k: true,
    mlflow25_temperature_scale: 1.0,
    ..DEFAULTS
};

pub static DATABRICKS_MODEL_SERVING: ProviderInfo = ProviderInfo {
    provider: Provider::DatabricksModelServing,
    stream_options: false,
    mlflow25_listed_as: "databricks-model-serving",
    ..DEFAULTS
};

pub static MLFLOW_MODEL_SERVING: ProviderInfo = ProviderInfo {
    provider: Provider::MlflowModelServing,
    wire: None,
    // A model server usually runs without auth; a key, when given, is sent as a bearer token.
    credential_keys: CredentialKeys::ApiKey { required: false },
    mlflow25_temperature_scale: 1.0,
    ..DEFAULTS
};

pub static MISTRAL: ProviderInfo = ProviderInfo {
    provider: Provider::Mistral,
    route_types: CHAT_EMBEDDINGS,
    stream_options: false,
    default_api_base: Some("https://api.mistral.ai/v1"),
    mlflow25_temperature_scale: 1.0,
    ..DEFAULTS
};

pub static AI21: ProviderInfo = ProviderInfo {
    provider: Provider::Ai21,
    route_types: CHAT,
    default_api_base: Some("https://api.ai21.com/studio/v1"),
    mlflow25_temperature_scale: 1.0,
    ..DEFAULTS
};

pub static TOGETHER: ProviderInfo = ProviderInfo {
    provider: Provider::Together,
    default_api_base: Some("https://api.together.xyz/v1"),
    ..DEFAULTS
};

pub static GROQ: ProviderInfo = ProviderInfo {
    provider: Provider::Groq,
    route_types: CHAT_EMBEDDINGS,
    default_api_base: Some("https://api.groq.com/openai/v1"),
    ..DEFAULTS
};

pub static DEEPSEEK: ProviderInfo = ProviderInfo {
    provider: Provider::Deepseek,
    route_types: CHAT,
    default_api_base: Some("https://api.deepseek.com"),
    ..DEFAULTS
};

pub static OLLAMA: ProviderInfo = ProviderInfo {
    provider: Provider::Ollama,
    credential_keys: CredentialKeys::ApiKey { required: false },
    default_api_base: Some("http://localhost:11434/v1"),
    ..DEFAULTS
};

pub static OPENAI_COMPATIBLE: ProviderInfo = ProviderInfo {
    credential_keys: CredentialKeys::ApiKey { required: false },
    ..DEFAULTS
};

/// The row of `provider`; the match is exhaustive, so a new provider fails to compile here first.
pub fn info(provider: Provider) -> &'static ProviderInfo {
    match provider {
        Provider::Openai => &OPENAI,
        Provider::AzureOpenai => &AZURE_OPENAI,
        Provider::Anthropic => &ANTHROPIC,
        Provider::Cohere => &COHERE,
        Provider::Gemini => &GEMINI,
        Provider::Bedrock => &BEDROCK,
        Provider::HuggingfaceTgi => &HUGGINGFACE_TGI,
        Provider::DatabricksModelServing => &DATABRICKS_MODEL_SERVING,
        Provider::MlflowModelServing => &MLFLOW_MODEL_SERVING,
        Provider::Mistral => &MISTRAL,
        Provider::Ai21 => &AI21,
        Provider::Together => &TOGETHER,
        Provider::Groq => &GROQ,
        Provider::Deepseek => &DEEPSEEK,
        Provider::Ollama => &OLLAMA,
        Provider::OpenaiCompatible => &OPENAI_COMPATIBLE,
    }
}
