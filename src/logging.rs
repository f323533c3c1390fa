//! Logs: tracing to stderr as text or JSON lines, with a filter the control socket can
//! change at run time (`log_level`).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (colours on a terminal).
    Text,
    /// One JSON object per event (for journald or a log shipper).
    Json,
}

/// Changes the running filter.
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
}

/// A filter from a level (`debug`) or a RUST_LOG-style directive list
/// (`info,pollblk_engine::reactor=debug`).
fn filter(level: &str) -> Result<EnvFilter, String> {
    EnvFilter::builder()
        .parse(level)
        .map_err(|e| format!("log level {level:?}: {e} (expected error, warn, info, debug, trace or RUST_LOG directives)"))
}

impl LogControl {
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let filter = filter(level)?;
        self.handle
            .reload(filter)
            .map_err(|e| format!("log level: {e}"))
    }
}

/// Starts logging: `level` if given, else RUST_LOG, else info.
pub fn init(level: Option<&str>, format: LogFormat) -> Result<LogControl, String> {
    let filter = match level {
        Some(level) => filter(level)?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => registry
            .with(layer.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
            .init(),
        LogFormat::Json => registry.with(layer.json().flatten_event(true)).init(),
    }
    Ok(LogControl { handle })
}
