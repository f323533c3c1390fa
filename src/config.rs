//! The config file (`pollblk serve --config FILE`): the daemon's options under the names of
//! its command-line flags, and its disks as `[[export]]` tables, each either the `--export`
//! string (`spec = "vhost-user-blk,socket=...,file=..."`) or its keys one by one
//! (`type = "vhost-user-blk"`, `socket = "..."`, `file = "..."`, `num-queues = 4`).
//! With `--persist`, runtime changes rewrite the `[[export]]` tables (the rest is kept).

use crate::logging::LogFormat;
use serde::Deserialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The file's contents; every field is optional (flags given on the command line win).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    pub cores: Option<String>,
    pub poll_mode: Option<String>,
    pub poll_idle_us: Option<u64>,
    pub stats_dir: Option<PathBuf>,
    pub stats_group: Option<toml::Value>,
    pub guest_stats_interval: Option<f64>,
    pub control: Option<PathBuf>,
    pub control_group: Option<toml::Value>,
    pub socket_owner: Option<toml::Value>,
    pub socket_group: Option<toml::Value>,
    pub socket_mode: Option<String>,
    pub thin_commit_period: Option<f64>,
    pub log_level: Option<String>,
    pub log_format: Option<LogFormat>,
    #[serde(default)]
    pub export: Vec<toml::Table>,
}

/// A disk of the config file: its name, if given, and its `--export` string.
#[derive(Debug, PartialEq, Eq)]
pub struct ExportEntry {
    pub name: Option<String>,
    pub spec: String,
}

/// A group given as a name or a number.
pub fn group_text(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(n) if *n >= 0 => Ok(n.to_string()),
        other => Err(format!("a group is a name or a number, not {other}")),
    }
}

/// Reads `path`.
pub fn load(path: &Path) -> Result<Config, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

impl Config {
    /// The disks, in file order.
    pub fn exports(&self) -> Result<Vec<ExportEntry>, String> {
        self.export
            .iter()
            .enumerate()
            .map(|(i, table)| entry(table).map_err(|e| format!("[[export]] number {}: {e}", i + 1)))
            .collect()
    }
}

fn entry(table: &toml::Table) -> Result<ExportEntry, String> {
    let name = match table.get("name") {
        None => None,
        Some(toml::Value::String(s)) => Some(s.clone()),
        Some(other) => return Err(format!("name must be a string, not {other}")),
    };
    let keys: Vec<(&String, &toml::Value)> = table.iter().filter(|(k, _)| *k != "name").collect();
    if let Some(spec) = table.get("spec") {
        if keys.len() > 1 {
            return Err(
                "give either spec or the export's keys (type, socket, ...), not both".into(),
            );
        }
        let spec = spec
            .as_str()
            .ok_or_else(|| format!("spec must be a string, not {spec}"))?;
        return Ok(ExportEntry {
            name,
            spec: spec.to_string(),
        });
    }
    let kind = table.get("type").and_then(toml::Value::as_str).ok_or(
        "needs spec = \"...\" or type = \"vhost-user-blk\" (or xen-blkif-loopback, xen-blkif)",
    )?;
    let mut spec = kind.to_string();
    for (key, value) in keys {
        if key == "type" {
            continue;
        }
        let part = match value {
            toml::Value::String(s) if s.contains(',') => {
                return Err(format!("{key} = {s:?}: a value cannot contain a comma"))
            }
            toml::Value::String(s) => format!("{key}={s}"),
            toml::Value::Integer(n) => format!("{key}={n}"),
            // `null = true` is the bare word of --export.
            toml::Value::Boolean(true) if key == "null" => "null".to_string(),
            toml::Value::Boolean(false) if key == "null" => continue,
            toml::Value::Boolean(b) => format!("{key}={}", if *b { "on" } else { "off" }),
            other => {
                return Err(format!(
                    "{key} = {other}: expected a string, integer or boolean"
                ))
            }
        };
        spec.push(',');
        spec.push_str(&part);
    }
    Ok(ExportEntry { name, spec })
}

/// Rewrites the `[[export]]` tables of the config file at `path` (created if missing) with
/// `disks` (name, spec), keeping every other setting. Atomic: a crash leaves the old file
/// or the new one.
pub fn save_exports(path: &Path, disks: &[(String, String)]) -> Result<(), String> {
    let mut table: toml::Table = match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let exports: Vec<toml::Value> = disks
        .iter()
        .map(|(name, spec)| {
            let mut t = toml::Table::new();
            t.insert("name".into(), toml::Value::String(name.clone()));
            t.insert("spec".into(), toml::Value::String(spec.clone()));
            toml::Value::Table(t)
        })
        .collect();
    table.insert("export".into(), toml::Value::Array(exports));
    let text = toml::to_string(&table).map_err(|e| e.to_string())?;
    let text = format!(
        "# pollblk configuration; the [[export]] tables are rewritten by the daemon (--persist).\n{text}"
    );
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        if let Ok(meta) = std::fs::metadata(path) {
            file.set_permissions(meta.permissions())?;
        }
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    };
    write().map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn both_export_forms_give_the_export_string() {
        let config = parse(
            r#"
            poll-mode = "adaptive"
            [[export]]
            name = "vm1"
            spec = "vhost-user-blk,socket=/run/vm1.sock,file=/img"
            [[export]]
            type = "vhost-user-blk"
            socket = "/run/scratch.sock"
            null = true
            size = "1G"
            num-queues = 4
            readonly = true
            "#,
        )
        .unwrap();
        let exports = config.exports().unwrap();
        assert_eq!(
            exports[0],
            ExportEntry {
                name: Some("vm1".into()),
                spec: "vhost-user-blk,socket=/run/vm1.sock,file=/img".into()
            }
        );
        assert_eq!(exports[1].name, None);
        // Keys in table order (sorted); the spec parser does not care about order.
        let spec: crate::export::Export = exports[1].spec.parse().unwrap();
        assert_eq!(spec.num_queues, 4);
        assert!(spec.readonly);
        assert!(exports[1].spec.starts_with("vhost-user-blk,"));
    }

    #[test]
    fn mistakes_are_named() {
        let unknown = parse("poll-mod = \"poll\"").unwrap_err();
        assert!(unknown.contains("poll-mod"), "{unknown}");
        let config = parse("[[export]]\nsocket = \"/s\"").unwrap();
        assert!(config.exports().unwrap_err().contains("type"));
        let config = parse("[[export]]\ntype = \"vhost-user-blk\"\nsocket = \"/a,b\"").unwrap();
        assert!(config.exports().unwrap_err().contains("comma"));
        let config = parse("[[export]]\nspec = \"x\"\nsocket = \"/a\"").unwrap();
        assert!(config.exports().unwrap_err().contains("not both"));
    }

    #[test]
    fn saving_keeps_the_other_settings_and_replaces_the_disks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pollblk.toml");
        std::fs::write(
            &path,
            "cores = \"0\"\n[[export]]\nname = \"old\"\nspec = \"vhost-user-blk,socket=/o,null,size=1M\"\n",
        )
        .unwrap();
        save_exports(
            &path,
            &[("a".into(), "vhost-user-blk,socket=/a,null,size=2M".into())],
        )
        .unwrap();
        let config = load(&path).unwrap();
        assert_eq!(config.cores.as_deref(), Some("0"));
        assert_eq!(
            config.exports().unwrap(),
            vec![ExportEntry {
                name: Some("a".into()),
                spec: "vhost-user-blk,socket=/a,null,size=2M".into()
            }]
        );
    }

    #[test]
    fn the_packaged_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/pollblk.toml");
        let config = load(&path).unwrap();
        for e in config.exports().unwrap() {
            e.spec.parse::<crate::export::Export>().unwrap();
        }
    }
}
