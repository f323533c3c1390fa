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
/// A bare word is taken as a level, never as a module name (EnvFilter would accept
/// `loud` as "everything from target loud"), so a typo is an error, not silence.
fn filter(level: &str) -> Result<EnvFilter, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let expected = "expected off, error, warn, info, debug, trace or RUST_LOG directives \
                    such as info,pollblk_engine=debug";
    for directive in level.split(',').map(str::trim) {
        let bare_word = !directive.contains('=') && !directive.contains('[');
        if bare_word && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "log level {level:?}: {directive:?} is not a level ({expected})"
            ));
        }
    }
    EnvFilter::builder()
        .parse(level)
        .map_err(|e| format!("log level {level:?}: {e} ({expected})"))
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

#[cfg(test)]
mod tests {
    use super::filter;

    #[test]
    fn levels_and_directives_pass_and_stray_words_do_not() {
        for good in [
            "info",
            "DEBUG",
            "warn,pollblk_engine=trace",
            "pollblk=debug",
            "off",
        ] {
            assert!(filter(good).is_ok(), "{good}");
        }
        for bad in ["loud", "info,verbose", "", "pollblk=loud"] {
            let error = filter(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(error.contains("log level"), "{error}");
        }
    }
}
