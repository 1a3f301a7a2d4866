//! `portcullis-sim`: the simulated providers as a standalone server (for `make run` and `make bench`).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use portcullis_sim::{Behaviour, SimProvider};

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
    tokio::signal::ctrl_c().await?;
    Ok(())
}
