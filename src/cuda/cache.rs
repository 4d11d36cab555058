//! The compiled kernels kept on disk, so only the first process on a machine pays NVRTC's
//! ~15 s (every DDP rank and every notebook restart would otherwise pay it again).
//!
//! One file per architecture and build: `<dir>/<arch>-<key>.cubin`, where the key hashes the
//! kernel source, the compile options, NVRTC's version and hlora's version, so a changed
//! kernel or toolchain never loads a stale binary. A file holds a header (magic, key, length,
//! checksum) before the cubin; anything that does not check out is recompiled and replaced.
//! Writes go to a temporary file renamed into place: a crash or two ranks writing at once
//! leave either no file or a whole one. The directory is `HLORA_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/hlora`, else `~/.cache/hlora`; `HLORA_CACHE_DIR=off` disables the cache.
//! A cache that cannot be written is skipped silently: it only saves time.

use crate::error::Result;
use std::path::PathBuf;

const MAGIC: &[u8; 8] = b"HLCUBIN1";
const HEADER: usize = 8 + 8 + 8 + 8;

/// FNV-1a, 64 bits: stable across builds and platforms (std's hasher promises neither).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &byte in *part {
            h ^= u64::from(byte);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// What a cubin depends on, hashed.
pub fn key(source: &str, options: &[String], nvrtc: (i32, i32)) -> u64 {
    let opts = options.join("\u{1f}");
    let nvrtc = format!("{}.{}", nvrtc.0, nvrtc.1);
    fnv1a(&[
        source.as_bytes(),
        opts.as_bytes(),
        nvrtc.as_bytes(),
        env!("CARGO_PKG_VERSION").as_bytes(),
    ])
}

/// The cache directory, or `None` when disabled or no home is known.
pub fn dir() -> Option<PathBuf> {
    match std::env::var_os("HLORA_CACHE_DIR") {
        Some(v) if v == "off" => None,
        Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(|v| PathBuf::from(v).join("hlora"))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/hlora"))),
    }
}

pub fn path(dir: &std::path::Path, arch: &str, key: u64) -> PathBuf {
    dir.join(format!("{arch}-{key:016x}.cubin"))
}

fn encode(key: u64, cubin: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + cubin.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&key.to_le_bytes());
    out.extend_from_slice(&(cubin.len() as u64).to_le_bytes());
    out.extend_from_slice(&fnv1a(&[cubin]).to_le_bytes());
    out.extend_from_slice(cubin);
    out
}

/// The cubin in `bytes` if the header matches `key` and the payload its length and checksum.
fn decode(bytes: &[u8], key: u64) -> Option<Vec<u8>> {
    let word = |i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(bytes.get(i..i + 8)?.try_into().ok()?))
    };
    if bytes.get(..8)? != MAGIC || word(8)? != key {
        return None;
    }
    let payload = bytes.get(HEADER..)?;
    (word(16)? == payload.len() as u64 && word(24)? == fnv1a(&[payload])).then(|| payload.to_vec())
}

/// Whether a cubin came from the disk cache or from NVRTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Disk,
    Compiled,
}

/// The cubin for `key` from the cache directory, else `compile()`d and stored there.
pub fn load_or_compile(
    arch: &str,
    key: u64,
    compile: impl FnOnce() -> Result<Vec<u8>>,
) -> Result<(Vec<u8>, Origin, Option<PathBuf>)> {
    let Some(dir) = dir() else {
        return Ok((compile()?, Origin::Compiled, None));
    };
    let file = path(&dir, arch, key);
    if let Some(cubin) = std::fs::read(&file).ok().and_then(|b| decode(&b, key)) {
        return Ok((cubin, Origin::Disk, Some(file)));
    }
    let cubin = compile()?;
    let stored = store(&dir, &file, &encode(key, &cubin)).is_ok();
    Ok((cubin, Origin::Compiled, stored.then_some(file)))
}

fn store(dir: &std::path::Path, file: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = file.with_extension(format!("tmp.{}", std::process::id()));
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, file));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_change_with_every_input() {
        let opts = vec!["--gpu-architecture=sm_90".to_string()];
        let k = key("src", &opts, (13, 0));
        assert_eq!(k, key("src", &opts, (13, 0)));
        assert_ne!(k, key("src2", &opts, (13, 0)));
        assert_ne!(
            k,
            key("src", &["--gpu-architecture=sm_80".to_string()], (13, 0))
        );
        assert_ne!(k, key("src", &opts, (13, 1)));
    }

    #[test]
    fn files_round_trip_and_damage_is_detected() {
        let cubin = vec![7u8; 100];
        let bytes = encode(42, &cubin);
        assert_eq!(decode(&bytes, 42), Some(cubin));
        assert_eq!(decode(&bytes, 43), None);
        assert_eq!(decode(&bytes[..bytes.len() - 1], 42), None);
        let mut flipped = bytes.clone();
        flipped[HEADER + 50] ^= 1;
        assert_eq!(decode(&flipped, 42), None);
        assert_eq!(decode(b"short", 42), None);
    }
}
