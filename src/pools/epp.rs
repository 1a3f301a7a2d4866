//! The Inference Extension's endpoint-picker protocol (an InferencePool's `endpointPickerRef`):
//! Envoy's ext_proc gRPC stream. The gateway sends the request's headers, then its body; the
//! picker answers the headers with a mutation setting `x-gateway-destination-endpoint` to the
//! chosen `ip:port` (several, comma-separated: the first is the choice, the rest fallbacks).
//! One stream per call, under a deadline; the stream is dropped once the choice is read.
//!
//! Pickers serve TLS by default with a certificate they make themselves at start (the API has
//! no field for a CA to check it against), and the Inference Extension's reference gateway
//! configurations connect without verifying it; so does this client: the exchange is encrypted,
//! the picker's certificate is not checked (the handshake's signature still is). `plaintext`
//! speaks h2c to pickers run without TLS (`--secure-serving=false`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The subset of the published protos the exchange uses (`envoy/service/ext_proc/v3/
/// external_processor.proto`, `envoy/config/core/v3/base.proto`), field numbers unchanged
/// (checked against go-control-plane/envoy v1.37.0's generated code); protobuf readers skip the
/// fields a message does not declare, so the picker's other fields are ignored safely.
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HeaderValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
        #[prost(bytes = "vec", tag = "3")]
        pub raw_value: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HeaderMap {
        #[prost(message, repeated, tag = "1")]
        pub headers: Vec<HeaderValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HttpHeaders {
        #[prost(message, optional, tag = "1")]
        pub headers: Option<HeaderMap>,
        #[prost(bool, tag = "3")]
        pub end_of_stream: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HttpBody {
        #[prost(bytes = "vec", tag = "1")]
        pub body: Vec<u8>,
        #[prost(bool, tag = "2")]
        pub end_of_stream: bool,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Request {
        #[prost(message, tag = "2")]
        RequestHeaders(HttpHeaders),
        #[prost(message, tag = "4")]
        RequestBody(HttpBody),
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ProcessingRequest {
        #[prost(oneof = "Request", tags = "2, 4")]
        pub request: Option<Request>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HeaderValueOption {
        #[prost(message, optional, tag = "1")]
        pub header: Option<HeaderValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HeaderMutation {
        #[prost(message, repeated, tag = "1")]
        pub set_headers: Vec<HeaderValueOption>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CommonResponse {
        #[prost(message, optional, tag = "2")]
        pub header_mutation: Option<HeaderMutation>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HeadersResponse {
        #[prost(message, optional, tag = "1")]
        pub response: Option<CommonResponse>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImmediateResponse {}

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Response {
        #[prost(message, tag = "1")]
        RequestHeaders(HeadersResponse),
        #[prost(message, tag = "7")]
        ImmediateResponse(ImmediateResponse),
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ProcessingResponse {
        #[prost(oneof = "Response", tags = "1, 7")]
        pub response: Option<Response>,
    }
}

/// The header (and `envoy.lb` metadata key) naming the chosen endpoint.
pub const DESTINATION: &str = "x-gateway-destination-endpoint";
const PROCESS: &str = "/envoy.service.ext_proc.v3.ExternalProcessor/Process";
/// The most answers read before the headers response (body chunks echoed first).
const MAX_MESSAGES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum EppError {
    #[error("the endpoint picker did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the endpoint picker failed: {0}")]
    Grpc(String),
    #[error("the endpoint picker refused the call")]
    Refused,
    #[error("the endpoint picker named no endpoint")]
    NoEndpoint,
    #[error("the endpoint picker's Service has no ready Pod")]
    NoAddress,
}

impl EppError {
    /// The metric label.
    pub fn code(&self) -> &'static str {
        match self {
            EppError::Timeout(_) => "timeout",
            EppError::Grpc(_) => "grpc",
            EppError::Refused => "refused",
            EppError::NoEndpoint => "no_endpoint",
            EppError::NoAddress => "no_address",
        }
    }
}

/// A connection to one endpoint picker (HTTP/2, made on first use, kept and re-made by tonic).
pub struct EndpointPicker {
    pub addr: SocketAddr,
    channel: tonic::transport::Channel,
    timeout: Duration,
}

impl EndpointPicker {
    pub fn new(addr: SocketAddr, timeout: Duration, plaintext: bool) -> Option<EndpointPicker> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(timeout)
            .tcp_nodelay(true);
        let channel = if plaintext {
            endpoint.connect_lazy()
        } else {
            endpoint.connect_with_connector_lazy(TlsConnector {
                addr,
                config: tls_config()?,
                timeout,
            })
        };
        Some(EndpointPicker {
            addr,
            channel,
            timeout,
        })
    }

    /// The endpoints the picker chooses for a request (`path`, `headers`, `body`), best first.
    pub async fn pick(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Vec<SocketAddr>, EppError> {
        tokio::time::timeout(self.timeout, self.exchange(path, headers, body))
            .await
            .map_err(|_| EppError::Timeout(self.timeout))?
    }

    async fn exchange(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Vec<SocketAddr>, EppError> {
        use proto::*;
        let header = |key: &str, value: &str| HeaderValue {
            key: key.to_string(),
            value: String::new(),
            raw_value: value.as_bytes().to_vec(),
        };
        let mut list = vec![
            header(":method", "POST"),
            header(":path", path),
            header(":scheme", "http"),
            header("content-length", &body.len().to_string()),
        ];
        list.extend(headers.iter().map(|(k, v)| header(k, v)));
        let messages = vec![
            ProcessingRequest {
                request: Some(Request::RequestHeaders(HttpHeaders {
                    headers: Some(HeaderMap { headers: list }),
                    end_of_stream: false,
                })),
            },
            ProcessingRequest {
                request: Some(Request::RequestBody(HttpBody {
                    body: body.to_vec(),
                    end_of_stream: true,
                })),
            },
        ];
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| EppError::Grpc(e.to_string()))?;
        let codec = tonic_prost::ProstCodec::<ProcessingRequest, ProcessingResponse>::default();
        let answer = grpc
            .streaming(
                tonic::Request::new(futures::stream::iter(messages)),
                http::uri::PathAndQuery::from_static(PROCESS),
                codec,
            )
            .await
            .map_err(|s| EppError::Grpc(s.code().description().to_string()))?;
        let mut inbound = answer.into_inner();
        for _ in 0..MAX_MESSAGES {
            let message = inbound
                .message()
                .await
                .map_err(|s| EppError::Grpc(s.code().description().to_string()))?
                .ok_or(EppError::NoEndpoint)?;
            match message.response {
                Some(Response::RequestHeaders(h)) => {
                    let set = h
                        .response
                        .and_then(|r| r.header_mutation)
                        .map(|m| m.set_headers)
                        .unwrap_or_default();
                    return destinations(&set).ok_or(EppError::NoEndpoint);
                }
                Some(Response::ImmediateResponse(_)) => return Err(EppError::Refused),
                None => continue,
            }
        }
        Err(EppError::NoEndpoint)
    }
}

/// TLS to a picker: ALPN h2 (gRPC servers require it), its own certificate taken as it is.
fn tls_config() -> Option<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Some(Arc::new(config))
}

/// Accepts the picker's self-made certificate; checks the handshake's signatures with it.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Opens TLS connections to one picker for tonic's channel.
#[derive(Clone)]
struct TlsConnector {
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

type TlsIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower_service::Service<http::Uri> for TlsConnector {
    type Response = TlsIo;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<TlsIo>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let connect = async {
                let tcp = tokio::net::TcpStream::connect(this.addr).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::IpAddress(this.addr.ip().into());
                tokio_rustls::TlsConnector::from(this.config)
                    .connect(name, tcp)
                    .await
            };
            let tls = tokio::time::timeout(this.timeout, connect)
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// The endpoints named by the destination header among `set`, in order; `None` when there is none.
fn destinations(set: &[proto::HeaderValueOption]) -> Option<Vec<SocketAddr>> {
    let value = set.iter().filter_map(|o| o.header.as_ref()).find_map(|h| {
        h.key.eq_ignore_ascii_case(DESTINATION).then(|| {
            if h.raw_value.is_empty() {
                h.value.clone()
            } else {
                String::from_utf8_lossy(&h.raw_value).into_owned()
            }
        })
    })?;
    let list: Vec<SocketAddr> = value
        .split(',')
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    (!list.is_empty()).then_some(list)
}

#[cfg(test)]
mod tests {
    use super::proto::*;
    use super::*;
    use prost::Message;

    #[test]
    fn the_destination_header_names_the_choice_then_the_fallbacks() {
        let set = vec![
            HeaderValueOption {
                header: Some(HeaderValue {
                    key: "X-Echo-Set-Header".into(),
                    value: String::new(),
                    raw_value: b"x".to_vec(),
                }),
            },
            HeaderValueOption {
                header: Some(HeaderValue {
                    key: DESTINATION.into(),
                    value: String::new(),
                    raw_value: b"10.0.0.2:8000, 10.0.0.3:8000,junk".to_vec(),
                }),
            },
        ];
        assert_eq!(
            destinations(&set).unwrap(),
            [
                "10.0.0.2:8000".parse::<SocketAddr>().unwrap(),
                "10.0.0.3:8000".parse().unwrap()
            ]
        );
        assert_eq!(destinations(&set[..1]), None);
    }

    #[test]
    fn messages_encode_with_the_published_field_numbers() {
        // request_headers is field 2 of ProcessingRequest: tag (2 << 3) | 2 = 0x12.
        let m = ProcessingRequest {
            request: Some(Request::RequestHeaders(HttpHeaders {
                headers: None,
                end_of_stream: true,
            })),
        };
        assert_eq!(m.encode_to_vec(), [0x12, 0x02, 0x18, 0x01]);
        // A response with fields this subset does not declare still decodes.
        let mut bytes = vec![0x0a, 0x00];
        bytes.extend([0x42, 0x00]); // dynamic_metadata (8), empty
        let r = ProcessingResponse::decode(bytes.as_slice()).unwrap();
        assert!(matches!(r.response, Some(Response::RequestHeaders(_))));
    }
}
