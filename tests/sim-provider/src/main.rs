//! `portcullis-sim`: the simulated providers as a standalone server (for `make run` and `make bench`).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use portcullis_sim::{Behaviour, ModelServer, ModelServerConfig, SimProvider};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    /// Pause between streamed chunks, in milliseconds.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Words per answer (one streamed chunk each).
    #[arg(long, default_value_t = 20)]
    words: usize,
    /// Keep a log of received requests (off for benchmarks).
    #[arg(long)]
    record: bool,
    /// Also serve a simulated vLLM-like model server on each of these addresses (make bench's
    /// pool of self-hosted servers).
    #[arg(long, value_delimiter = ',')]
    model_servers: Vec<SocketAddr>,
    /// A model server's running batch; more requests wait in its queue.
    #[arg(long, default_value_t = 4)]
    max_running: usize,
    /// A model server's time per output token (an answer has the request's max_tokens).
    #[arg(long, default_value_t = 5)]
    ms_per_token: u64,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let sim = SimProvider::start_on(args.listen, args.record).await?;
    sim.set_behaviour(Behaviour {
        chunk_delay: Duration::from_millis(args.chunk_delay_ms),
        answer_words: args.words,
        ..Default::default()
    });
    eprintln!("simulated providers listening on {}", sim.addr);
    for provider in portcullis_sim::PROVIDERS {
        eprintln!("  {provider:<26} {}", sim.base(provider));
    }
    let mut servers = Vec::new();
    for addr in &args.model_servers {
        let config = ModelServerConfig {
            max_running: args.max_running,
            per_token: Some(Duration::from_millis(args.ms_per_token)),
            ..Default::default()
        };
        servers.push(ModelServer::start(*addr, config).await?);
        eprintln!("  model server (vLLM-like, model llama) {addr}");
    }
    tokio::signal::ctrl_c().await?;
    Ok(())
}
