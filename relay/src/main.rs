//! `outbox-relay`: parses flags, sets up logging and signal handling, and
//! hands over to the library.

use std::process::ExitCode;

use clap::Parser;
use outbox_relay::cli::{Cli, Command, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

// mimalloc for Rust and, through its `override` feature, for librdkafka's
// C allocations too: librdkafka makes about eight small allocations per
// record (message, header list, one per header) and glibc malloc's slow path
// was a fifth of the relay's CPU in the drain benchmark; with mimalloc the
// relay's CPU per event dropped by about a third. `no_thp` keeps mimalloc
// off transparent huge pages, which otherwise doubled the relay's RSS.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // The span exporter runs on a thread of its own, started before the
    // runtime and shut down after it, so exporting never holds up the
    // runtime's one thread.
    let traces = match &cli.command {
        Command::Run(args) => args
            .traces_config()
            .and_then(|cfg| outbox_relay::traces::Traces::start(&cfg)),
        _ => Ok(outbox_relay::traces::Traces::disabled()),
    };
    let result = match traces {
        Ok(traces) => {
            // One thread: the relay is one stream, and serving Kafka's
            // delivery reports on the thread that produced the records lets
            // allocations be freed where they were made (see `kafka::reports`).
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(err) => {
                    eprintln!("error: cannot start the async runtime: {err}");
                    return ExitCode::FAILURE;
                }
            };
            let result = runtime.block_on(dispatch(cli.command, traces.clone()));
            drop(runtime);
            traces.shutdown(std::time::Duration::from_secs(5));
            result
        }
        Err(err) => Err(err),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            tracing::error!(error = %err, "outbox-relay stopped");
            eprintln!("error: {err}");
            if matches!(err, outbox_relay::Error::Config(_)) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn dispatch(
    command: Command,
    traces: outbox_relay::traces::Traces,
) -> outbox_relay::Result<ExitCode> {
    match command {
        Command::Migrate(args) if args.bookkeeping_only => {
            outbox_relay::migrate::bookkeeping(&args.database.pg_config()?, &args.schema).await?
        }
        Command::Migrate(args) => outbox_relay::migrate::run(&args.database.pg_config()?).await?,
        Command::Replay(args) => {
            let cfg = args.replay_config()?;
            let token = CancellationToken::new();
            tokio::spawn(cancel_on_signal(token.clone()));
            outbox_relay::replay::run(&cfg, &token).await?;
        }
        Command::Verify(args) => {
            let report = outbox_relay::verify::run(&args.verify_config()?).await?;
            print!("{}", report.to_text());
            if !report.ok() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Prune(args) => {
            outbox_relay::prune::run(&args.prune_config()?).await?;
        }
        Command::Status(args) => {
            // Exit 3 when the status cannot be read (Nagios' UNKNOWN): 1 and
            // 2 are verdicts.
            let status =
                match async { outbox_relay::status::run(&args.status_config()?).await }.await {
                    Ok(status) => status,
                    Err(err) => {
                        eprintln!("error: {err}");
                        return Ok(ExitCode::from(3));
                    }
                };
            if args.json {
                println!("{}", status.to_json());
            } else {
                print!("{}", status.to_text());
            }
            return Ok(ExitCode::from(status.health.exit_code()));
        }
        Command::Run(args) => {
            let mut cfg = args.relay_config()?;
            let pruner = args.pruner()?;
            cfg.traces = traces;
            let token = CancellationToken::new();
            tokio::spawn(cancel_on_signal(token.clone()));
            if let Some((prune, every)) = pruner {
                tokio::spawn(outbox_relay::prune::every(prune, every, token.clone()));
            }
            outbox_relay::run(cfg, token).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn cancel_on_signal(token: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(err) => {
            tracing::error!(error = %err, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; stopping"),
    }
    token.cancel();
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("OUTBOX_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
