//! `pollblk pool ...`: create and inspect thin pools offline (a pool in use by a running
//! daemon is locked and refused).

use crate::pool_view::{status_text, status_value};
use clap::Subcommand;
use pollblk_engine::thin::{self, Pool, DEFAULT_BLOCK_SIZE};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum PoolCommand {
    /// Create a pool: DIR/data (sparse, SIZE rounded down to whole blocks), or data on a
    /// block device, and its metadata in DIR.
    Create {
        dir: PathBuf,
        /// Data size (K/M/G/T suffixes); with --data-device, at most the device's (default:
        /// all of it).
        #[arg(long, value_parser = crate::export::parse_size, required_unless_present = "data_device")]
        size: Option<u64>,
        /// Keep the data on this block device (or existing file) instead of DIR/data.
        #[arg(long, value_name = "PATH")]
        data_device: Option<PathBuf>,
        /// Data block size: a power of two from 4K to 2M.
        #[arg(long, value_parser = crate::export::parse_size, default_value_t = u64::from(DEFAULT_BLOCK_SIZE))]
        block_size: u64,
    },
    /// Manage the pool's volumes.
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// Size, used and free space, and each volume's mapped bytes, as of the last commit
    /// (works while a daemon serves the pool, which commits every --thin-commit-period);
    /// with --control, as they are now in the daemon that serves the pool.
    Status {
        dir: PathBuf,
        /// {"block_size", "size_bytes", "used_bytes", "free_bytes", "volumes": [{"name",
        /// "size_bytes", "mapped_bytes", "owned_bytes", "shared_bytes", "snapshot",
        /// "origin"}]}; owned_bytes is what deleting the volume would free (a block copied
        /// on write counts as shared until the copy is committed).
        #[arg(long)]
        json: bool,
        /// Ask the daemon serving the pool through its control socket (live figures).
        #[arg(long, value_name = "SOCKET")]
        control: Option<PathBuf>,
    },
    /// Verify the pool's metadata (checksums, every mapped block owned once, free space
    /// agrees); exit 0 only when consistent.
    Check { dir: PathBuf },
}

#[derive(Subcommand)]
pub enum VolumeCommand {
    /// Create a volume of SIZE bytes (thin: it takes space only when written).
    Create {
        dir: PathBuf,
        name: String,
        #[arg(long, value_parser = crate::export::parse_size)]
        size: u64,
    },
    /// Delete a volume, snapshot or clone and free the blocks no other volume shares.
    Delete { dir: PathBuf, name: String },
    /// Take SNAPSHOT of VOLUME: a read-only copy of what it holds now, sharing its blocks
    /// (it takes space only as the two diverge). For a volume being served, ask the daemon:
    /// `pollblk rpc volume_snapshot`.
    Snapshot {
        dir: PathBuf,
        volume: String,
        snapshot: String,
    },
    /// Create writable volume NEW from SNAPSHOT, sharing every block with it until written.
    Clone {
        dir: PathBuf,
        snapshot: String,
        new: String,
    },
    /// Make a clone own every block it shares (copying them), so deleting its snapshot or
    /// the other clones frees nothing it uses.
    Inflate { dir: PathBuf, name: String },
    /// Create a volume from a raw image (sparse: holes and zero blocks take no space); `-`
    /// reads stdin (e.g. from `qemu-img convert -O raw IMAGE /dev/stdout`).
    Import {
        dir: PathBuf,
        name: String,
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
    },
    /// Write a volume to a new raw image file (sparse: blocks never written stay holes);
    /// `-` writes stdout.
    Export {
        dir: PathBuf,
        name: String,
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
    /// Change a volume's size. Growing is safe; shrinking drops whatever the volume holds
    /// past the new size, so it needs --shrink (and says how much it drops).
    Resize {
        dir: PathBuf,
        name: String,
        #[arg(long, value_parser = crate::export::parse_size)]
        size: u64,
        /// Allow the volume to get smaller (its data past the new size is lost).
        #[arg(long)]
        shrink: bool,
    },
}

pub fn run(command: PoolCommand) -> Result<(), String> {
    let err = |e: thin::ThinError| e.to_string();
    match command {
        PoolCommand::Create {
            dir,
            size,
            data_device,
            block_size,
        } => {
            let block_size = u32::try_from(block_size)
                .map_err(|_| format!("--block-size {block_size}: at most 2M"))?;
            let pool =
                Pool::create_on(&dir, data_device.as_deref(), size, block_size).map_err(err)?;
            let s = pool.status();
            println!(
                "pollblk: pool {} created: {} bytes in {} blocks of {} bytes",
                dir.display(),
                s.size_bytes,
                s.size_bytes / u64::from(s.block_size),
                s.block_size
            );
        }
        PoolCommand::Volume { command } => run_volume(command)?,
        PoolCommand::Status { dir, json, control } => status(&dir, json, control)?,
        PoolCommand::Check { dir } => {
            let status = thin::check(&dir).map_err(|e| {
                // Opening errors name the directory already; the others do not.
                let message = e.to_string();
                match message.starts_with(&dir.display().to_string()) {
                    true => message,
                    false => format!("{}: {message}", dir.display()),
                }
            })?;
            println!(
                "pollblk: pool {} is consistent: {} volume(s), {} of {} bytes used",
                dir.display(),
                status.volumes.len(),
                status.used_bytes,
                status.size_bytes
            );
        }
    }
    Ok(())
}

/// `pollblk pool volume ...`.
fn run_volume(command: VolumeCommand) -> Result<(), String> {
    let err = |e: thin::ThinError| e.to_string();
    match command {
        VolumeCommand::Create { dir, name, size } => {
            let pool = Pool::open(&dir).map_err(err)?;
            pool.volume_create(&name, size).map_err(err)?;
            println!(
                "pollblk: volume {name} ({size} bytes) created in {}",
                dir.display()
            );
        }
        VolumeCommand::Resize {
            dir,
            name,
            size,
            shrink,
        } => {
            let pool = Pool::open(&dir).map_err(err)?;
            let volume = pool.volume(&name).map_err(err)?;
            let old = volume.size_bytes();
            let bs = u64::from(pool.block_size());
            // Whole blocks past the new end are dropped; a block cut in two keeps its head.
            let dropped = volume.mapped_blocks_from(size.div_ceil(bs)) * bs;
            if size < old && !shrink {
                return Err(format!(
                    "volume {name} is {old} bytes: shrinking it to {size} drops the last \
                     {} bytes, {dropped} bytes of them holding data; add --shrink to do it",
                    old - size
                ));
            }
            pool.volume_resize(&name, size).map_err(err)?;
            let note = match size < old {
                true => format!(" ({dropped} bytes of data dropped)"),
                false => String::new(),
            };
            println!(
                "pollblk: volume {name} resized from {old} to {size} bytes in {}{note}",
                dir.display()
            );
        }
        VolumeCommand::Import { dir, name, from } => {
            let pool = Pool::open(&dir).map_err(err)?;
            let copied = crate::image_io::import(&pool, &name, &from)?;
            eprintln!(
                "pollblk: volume {name} of {} imported from {}: {} bytes, {} of them data",
                dir.display(),
                from.display(),
                copied.bytes,
                copied.data_bytes
            );
        }
        VolumeCommand::Export { dir, name, to } => {
            let pool = Pool::open(&dir).map_err(err)?;
            let copied = crate::image_io::export(&pool, &name, &to)?;
            eprintln!(
                "pollblk: volume {name} of {} exported to {}: {} bytes, {} of them data",
                dir.display(),
                to.display(),
                copied.bytes,
                copied.data_bytes
            );
        }
        copy @ (VolumeCommand::Snapshot { .. }
        | VolumeCommand::Clone { .. }
        | VolumeCommand::Inflate { .. }) => run_sharing(copy)?,
        VolumeCommand::Delete { dir, name } => {
            let pool = Pool::open(&dir).map_err(err)?;
            pool.volume_delete(&name).map_err(err)?;
            println!("pollblk: volume {name} deleted from {}", dir.display());
        }
    }
    Ok(())
}

/// `pollblk pool volume snapshot | clone | inflate`: the commands about shared blocks.
fn run_sharing(command: VolumeCommand) -> Result<(), String> {
    let err = |e: thin::ThinError| e.to_string();
    match command {
        VolumeCommand::Snapshot {
            dir,
            volume,
            snapshot,
        } => {
            let pool = Pool::open(&dir).map_err(err)?;
            let made = pool.volume_snapshot(&volume, &snapshot).map_err(err)?;
            println!(
                "pollblk: snapshot {snapshot} of volume {volume} taken in {} ({} bytes shared)",
                dir.display(),
                made.shared_bytes
            );
        }
        VolumeCommand::Clone { dir, snapshot, new } => {
            let pool = Pool::open(&dir).map_err(err)?;
            let made = pool.volume_clone(&snapshot, &new).map_err(err)?;
            println!(
                "pollblk: volume {new} cloned from snapshot {snapshot} in {} ({} bytes shared)",
                dir.display(),
                made.shared_bytes
            );
        }
        VolumeCommand::Inflate { dir, name } => {
            let pool = Pool::open(&dir).map_err(err)?;
            let copied = pool.volume_inflate(&name).map_err(err)?;
            println!(
                "pollblk: volume {name} of {} inflated: {copied} bytes copied, it shares none",
                dir.display()
            );
        }
        _ => unreachable!("run_volume hands over only these"),
    }
    Ok(())
}

/// `pollblk pool status`: the last commit's figures, or with `control` the daemon's live ones.
fn status(dir: &Path, json: bool, control: Option<PathBuf>) -> Result<(), String> {
    let (value, source) = match control {
        Some(socket) => {
            let mut params = serde_json::Map::new();
            params.insert("pool".into(), dir.display().to_string().into());
            let (value, _) = crate::rpc_cmd::call(&socket, "pool_status", params, 30)?;
            (value, "live, from the daemon serving it")
        }
        None => (
            status_value(&Pool::inspect(dir).map_err(|e| e.to_string())?),
            "as of its last commit (a serving daemon commits every \
                 --thin-commit-period; --control SOCKET asks it for live figures)",
        ),
    };
    if json {
        println!("{value}");
    } else {
        println!("pool {}: {source}", dir.display());
        print!("{}", status_text(&value));
    }
    Ok(())
}
