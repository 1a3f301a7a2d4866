//! The floor of `make bench`: forwards every request unchanged to one upstream over pooled
//! keep-alive connections and streams the answer back. It parses nothing and translates nothing,
//! so the gateway's figures divided by its figures say what the gateway's own work costs.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use clap::Parser;
use http::header::{HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    /// Where requests go: scheme, authority and a path prefix (`http://127.0.0.1:9000/openai`).
    #[arg(long)]
    upstream: Uri,
    /// One header added to every upstream request, `name: value` (the credential a gateway adds).
    #[arg(long)]
    header: Option<String>,
}

#[derive(Clone)]
struct Proxy {
    client: Client<HttpConnector, Incoming>,
    upstream: Uri,
    header: Option<(HeaderName, HeaderValue)>,
}

impl Proxy {
    async fn call(self, req: Request<Incoming>) -> Result<Response<Incoming>, String> {
        let (mut parts, body) = req.into_parts();
        let prefix = self.upstream.path().trim_end_matches('/');
        let path = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
        let mut uri = self.upstream.clone().into_parts();
        uri.path_and_query = Some(
            format!("{prefix}{path}")
                .parse()
                .map_err(|e| format!("{e}"))?,
        );
        parts.uri = Uri::from_parts(uri).map_err(|e| e.to_string())?;
        parts.headers.remove(http::header::HOST);
        if let Some((name, value)) = &self.header {
            parts.headers.insert(name.clone(), value.clone());
        }
        self.client
            .request(Request::from_parts(parts, body))
            .await
            .map_err(|e| e.to_string())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let header = match args.header.as_deref().map(|h| h.split_once(':')) {
        Some(Some((name, value))) => Some((name.trim().parse()?, value.trim().parse()?)),
        Some(None) => return Err("--header takes `name: value`".into()),
        None => None,
    };
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let proxy = Proxy {
        client: Client::builder(TokioExecutor::new()).build(connector),
        upstream: args.upstream,
        header,
    };
    let listener = TcpListener::bind(args.listen).await?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let proxy = proxy.clone();
                async move {
                    Ok::<_, Infallible>(match proxy.call(req).await {
                        Ok(response) => response.map(Either::Left),
                        Err(e) => bad_gateway(e),
                    })
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// The only answer of the proxy's own: the upstream could not be reached.
fn bad_gateway(message: String) -> Response<Either<Incoming, Full<Bytes>>> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(message))));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
