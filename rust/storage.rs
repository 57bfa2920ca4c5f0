//! Versioned binary file format of a [`PassRatePool`], and its atomic save.
//!
//! Layout, all little-endian:
//!
//! | offset | size | field                                                        |
//! |-------:|-----:|--------------------------------------------------------------|
//! |      0 |    8 | magic `b"DYNMPOOL"`                                          |
//! |      8 |    4 | format version (u32) = 2 (version 1 files are read too)      |
//! |     12 |    4 | flags (u32), 0; reserved                                     |
//! |     16 |    8 | prior α0 (f64)                                               |
//! |     24 |    8 | prior β0 (f64)                                               |
//! |     32 |    8 | forgetting factor ρ (f64)                                    |
//! |     40 |    8 | global evidence scale g (f64)                                |
//! |     48 |    8 | number of updates (u64)                                      |
//! |     56 |    8 | number of prompts P (u64)                                    |
//! |     64 |    8 | hash-table slots when saved (u64; a sizing hint)             |
//! |     72 |    4 | CRC-32 of bytes 0..72 (u32)                                  |
//! |     76 | 16·P | records: id (i64), stored successes (f32), failures (f32)    |
//! | 76+16P |    4 | CRC-32 of the records (u32)                                  |
//! | 80+16P | 2728 | version 2 only: the revisit calibration (`calibration.rs`):  |
//! |        |      | forget (f64), weight τ (f64), cells C = 169 (u32),           |
//! |        |      | C × observed (f64), C × predicted (f64), CRC-32 of the block |
//! |        |      | before it (u32)                                              |
//!
//! A version 1 file (no calibration block, otherwise identical) loads with an empty
//! calibration (every factor 1).
//!
//! Stored evidence is actual evidence divided by g, exactly as held in memory, so a round trip
//! is bit for bit. A file is refused (with the reason) when it is empty, foreign (bad magic),
//! of another version, truncated, longer than its header says, or fails a checksum.

use crate::calibration::{Calibration, CELLS};
use crate::error::{Error, Result};
use crate::pool::{PassRatePool, Slot};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub const MAGIC: &[u8; 8] = b"DYNMPOOL";
pub const VERSION: u32 = 2;
pub const HEADER_LEN: usize = 76;
const RECORD_LEN: usize = 16;
/// Length of the version-2 calibration block.
pub const CALIBRATION_LEN: usize = 8 + 8 + 4 + 16 * CELLS + 4;
/// Records converted per buffer when reading or writing.
const BATCH: usize = 1 << 16;

/// Size in bytes of the file holding `prompts` prompts.
pub fn file_len(prompts: u64) -> u64 {
    HEADER_LEN as u64 + RECORD_LEN as u64 * prompts + 4 + CALIBRATION_LEN as u64
}

fn calibration_block(c: &Calibration) -> Vec<u8> {
    let mut b = Vec::with_capacity(CALIBRATION_LEN);
    b.extend_from_slice(&c.forget.to_le_bytes());
    b.extend_from_slice(&c.weight.to_le_bytes());
    b.extend_from_slice(&(CELLS as u32).to_le_bytes());
    for x in c.observed.iter().chain(&c.predicted) {
        b.extend_from_slice(&x.to_le_bytes());
    }
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

fn parse_calibration(b: &[u8]) -> std::result::Result<Calibration, String> {
    let body = &b[..CALIBRATION_LEN - 4];
    if crc32fast::hash(body) != le_u32(&b[CALIBRATION_LEN - 4..]) {
        return Err("calibration checksum mismatch (the calibration block is corrupt)".into());
    }
    if le_u32(&b[16..]) as usize != CELLS {
        return Err(format!(
            "calibration block has {} cells, expected {CELLS}",
            le_u32(&b[16..])
        ));
    }
    let values: Vec<f64> = b[20..20 + 16 * CELLS].chunks_exact(8).map(le_f64).collect();
    let c = Calibration {
        forget: le_f64(&b[0..]),
        weight: le_f64(&b[8..]),
        observed: values[..CELLS].to_vec(),
        predicted: values[CELLS..].to_vec(),
    };
    if !c.is_valid() {
        return Err("the calibration block holds invalid values".into());
    }
    Ok(c)
}

fn header(pool: &PassRatePool) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    let (alpha0, beta0) = pool.prior();
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&0u32.to_le_bytes());
    h[16..24].copy_from_slice(&alpha0.to_le_bytes());
    h[24..32].copy_from_slice(&beta0.to_le_bytes());
    h[32..40].copy_from_slice(&pool.forget().to_le_bytes());
    h[40..48].copy_from_slice(&pool.scale().to_le_bytes());
    h[48..56].copy_from_slice(&pool.updates().to_le_bytes());
    h[56..64].copy_from_slice(&(pool.len() as u64).to_le_bytes());
    h[64..72].copy_from_slice(&(pool.slots() as u64).to_le_bytes());
    let crc = crc32fast::hash(&h[..72]);
    h[72..76].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Writes the whole file format to `w`.
pub fn write_pool<W: Write>(pool: &PassRatePool, w: &mut W) -> io::Result<()> {
    w.write_all(&header(pool))?;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = Vec::with_capacity(BATCH * RECORD_LEN);
    let mut flush = |buf: &mut Vec<u8>, w: &mut W| -> io::Result<()> {
        crc.update(buf);
        w.write_all(buf)?;
        buf.clear();
        Ok(())
    };
    for e in pool.stored_entries() {
        buf.extend_from_slice(&e.id.to_le_bytes());
        buf.extend_from_slice(&e.successes.to_le_bytes());
        buf.extend_from_slice(&e.failures.to_le_bytes());
        if buf.len() == BATCH * RECORD_LEN {
            flush(&mut buf, w)?;
        }
    }
    flush(&mut buf, w)?;
    w.write_all(&crc.finalize().to_le_bytes())?;
    w.write_all(&calibration_block(pool.calibration()))
}

pub fn to_bytes(pool: &PassRatePool) -> Vec<u8> {
    let mut out = Vec::with_capacity(file_len(pool.len() as u64) as usize);
    write_pool(pool, &mut out).expect("writing to memory cannot fail");
    out
}

pub fn from_bytes(bytes: &[u8]) -> Result<PassRatePool> {
    let mut reader = bytes;
    read_pool(&mut reader, bytes.len() as u64, Path::new("<bytes>"))
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}
fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}
fn le_f64(b: &[u8]) -> f64 {
    f64::from_le_bytes(b[..8].try_into().unwrap())
}

/// Reads as many bytes as available, up to `buf.len()`.
fn read_up_to<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Parses a pool from `r`, which holds exactly `len` bytes; `path` names the source in errors.
pub fn read_pool<R: Read>(r: &mut R, len: u64, path: &Path) -> Result<PassRatePool> {
    let bad = |problem: String| Error::bad_file(path, problem);
    let io_err = |e: io::Error| Error::io(path, "read", e);
    let mut h = [0u8; HEADER_LEN];
    let got = read_up_to(r, &mut h).map_err(io_err)?;
    if got == 0 {
        return Err(bad("the file is empty".into()));
    }
    if got < MAGIC.len() && h[..got] == MAGIC[..got] {
        return Err(bad(format!(
            "truncated: {got} bytes, shorter than the header"
        )));
    }
    if h[..MAGIC.len()] != MAGIC[..] {
        return Err(bad(format!(
            "bad magic bytes b\"{}\" (expected b\"{}\"): this is not a pool file",
            h[..MAGIC.len().min(got)].escape_ascii(),
            MAGIC.escape_ascii()
        )));
    }
    let version = if got >= 12 { le_u32(&h[8..]) } else { VERSION };
    if !(1..=VERSION).contains(&version) {
        return Err(bad(format!(
            "unsupported format version {version} (this build reads versions 1 to {VERSION})"
        )));
    }
    let tail_len = if version >= 2 { CALIBRATION_LEN } else { 0 } as u64;
    if got < HEADER_LEN {
        return Err(bad(format!(
            "truncated: {got} bytes, shorter than the {HEADER_LEN}-byte header"
        )));
    }
    if crc32fast::hash(&h[..72]) != le_u32(&h[72..]) {
        return Err(bad(
            "header checksum mismatch (the header is corrupt)".into()
        ));
    }
    let prompts = le_u64(&h[56..]);
    let expected = prompts
        .checked_mul(RECORD_LEN as u64)
        .and_then(|b| b.checked_add(HEADER_LEN as u64 + 4 + tail_len))
        .ok_or_else(|| bad(format!("header claims an impossible {prompts} prompts")))?;
    if len < expected {
        return Err(bad(format!(
            "truncated: {len} bytes, expected {expected} for {prompts} prompts"
        )));
    }
    if len > expected {
        return Err(bad(format!(
            "{} unexpected bytes after the data ({len} bytes, expected {expected})",
            len - expected
        )));
    }
    let mut pool = PassRatePool::from_state(
        le_f64(&h[16..]),
        le_f64(&h[24..]),
        le_f64(&h[32..]),
        le_f64(&h[40..]),
        le_u64(&h[48..]),
        prompts as usize,
        le_u64(&h[64..]) as usize,
    )
    .map_err(|e| bad(format!("invalid header: {e}")))?;

    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; BATCH * RECORD_LEN];
    let mut left = prompts as usize;
    // A content problem is reported only if the checksum holds (else: corrupt).
    let mut problem: Option<String> = None;
    let mut record = 0usize;
    let truncated = |e: io::Error| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            bad("truncated while reading the records".into())
        } else {
            io_err(e)
        }
    };
    while left > 0 {
        let take = left.min(BATCH);
        let chunk = &mut buf[..take * RECORD_LEN];
        r.read_exact(chunk).map_err(truncated)?;
        crc.update(chunk);
        for rec in chunk.chunks_exact(RECORD_LEN) {
            let slot = Slot {
                id: i64::from_le_bytes(rec[0..8].try_into().unwrap()),
                successes: f32::from_le_bytes(rec[8..12].try_into().unwrap()),
                failures: f32::from_le_bytes(rec[12..16].try_into().unwrap()),
            };
            let valid = |x: f32| x.is_finite() && x >= 0.0;
            if problem.is_none() {
                if !(valid(slot.successes) && valid(slot.failures)) {
                    problem = Some(format!(
                        "record {record} (id {}) has invalid evidence",
                        slot.id
                    ));
                } else if !pool.insert_stored(slot) {
                    problem = Some(format!("record {record}: duplicate prompt id {}", slot.id));
                }
            }
            record += 1;
        }
        left -= take;
    }
    let mut tail = [0u8; 4];
    r.read_exact(&mut tail).map_err(truncated)?;
    if crc.finalize() != u32::from_le_bytes(tail) {
        return Err(bad(
            "data checksum mismatch (the records are corrupt)".into()
        ));
    }
    if let Some(p) = problem {
        return Err(bad(p));
    }
    if version >= 2 {
        let mut block = vec![0u8; CALIBRATION_LEN];
        r.read_exact(&mut block).map_err(truncated)?;
        let c = parse_calibration(&block).map_err(bad)?;
        pool.set_calibration(c)
            .map_err(|e| bad(format!("invalid calibration: {e}")))?;
    }
    Ok(pool)
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Saves atomically: writes a temporary file in the same directory, fsyncs it, renames it over
/// `path`, then fsyncs the directory. A crash leaves either the old file or the new one.
pub fn save(pool: &PassRatePool, path: &Path) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("path {:?} does not name a file", path)))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| -> io::Result<()> {
        let file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write_pool(pool, &mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, "write", e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, "replace", e));
    }
    // Persist the rename itself; some file systems refuse to fsync a directory: not an error.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

pub fn load(path: &Path) -> Result<PassRatePool> {
    let file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, "read", e))?;
    if meta.is_dir() {
        return Err(Error::io(path, "read", io::Error::from_raw_os_error(21)));
    }
    let mut r = BufReader::with_capacity(1 << 20, file);
    read_pool(&mut r, meta.len(), path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PassRatePool {
        let mut p = PassRatePool::new(0.7, 1.3, 0.9, 0).unwrap();
        for step in 0..30i64 {
            let ids: Vec<i64> = (0..100)
                .map(|i| i * 7919 + step % 3)
                .chain([i64::MIN])
                .collect();
            let trials: Vec<i64> = ids.iter().map(|&i| 1 + (i.rem_euclid(16))).collect();
            let succ: Vec<i64> = trials.iter().map(|&t| t / 3).collect();
            p.update(&ids, &succ, &trials).unwrap();
        }
        p
    }

    fn same(a: &PassRatePool, b: &PassRatePool) {
        assert_eq!(a.prior(), b.prior());
        assert_eq!(a.forget().to_bits(), b.forget().to_bits());
        assert_eq!(a.scale().to_bits(), b.scale().to_bits());
        assert_eq!(a.updates(), b.updates());
        assert_eq!(a.calibration(), b.calibration());
        let mut ea: Vec<_> = a
            .stored_entries()
            .map(|s| (s.id, s.successes.to_bits(), s.failures.to_bits()))
            .collect();
        let mut eb: Vec<_> = b
            .stored_entries()
            .map(|s| (s.id, s.successes.to_bits(), s.failures.to_bits()))
            .collect();
        ea.sort();
        eb.sort();
        assert_eq!(ea, eb);
    }

    #[test]
    fn round_trip_is_bit_for_bit() {
        let p = sample();
        let bytes = to_bytes(&p);
        assert_eq!(bytes.len() as u64, file_len(p.len() as u64));
        same(&p, &from_bytes(&bytes).unwrap());
        let dir = std::env::temp_dir().join(format!("dynamo-pool-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pool.bin");
        save(&p, &path).unwrap();
        save(&p, &path).unwrap(); // replaces atomically
        same(&p, &load(&path).unwrap());
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left behind"
        );
        fs::remove_dir_all(&dir).unwrap();
        let empty = PassRatePool::new(1.0, 1.0, 1.0, 0).unwrap();
        same(&empty, &from_bytes(&to_bytes(&empty)).unwrap());
    }

    fn problem(bytes: &[u8]) -> String {
        from_bytes(bytes).unwrap_err().to_string()
    }

    #[test]
    fn damaged_files_are_refused_with_the_reason() {
        let bytes = to_bytes(&sample());
        assert!(problem(&[]).contains("the file is empty"));
        assert!(problem(&bytes[..5]).contains("truncated"));
        assert!(problem(&bytes[..40]).contains("truncated"));
        assert!(problem(&bytes[..bytes.len() - 1]).contains("truncated"));
        assert!(problem(&bytes[..200]).contains("truncated"));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(problem(&longer).contains("1 unexpected bytes"));
        assert!(problem(b"\x89PNG\r\n\x1a\n and more").contains("bad magic"));
        let mut v3 = bytes.clone();
        v3[8] = 3;
        assert!(problem(&v3).contains("unsupported format version 3"));
        let mut cal = bytes.clone();
        let at = cal.len() - 100;
        cal[at] ^= 1;
        assert!(problem(&cal).contains("calibration checksum mismatch"));
        let mut header = bytes.clone();
        header[20] ^= 1;
        assert!(problem(&header).contains("header checksum mismatch"));
        let mut data = bytes.clone();
        data[HEADER_LEN + 40] ^= 0x10;
        assert!(problem(&data).contains("data checksum mismatch"));
        let mut crc = bytes.clone();
        let records_end = bytes.len() - CALIBRATION_LEN - 1;
        crc[records_end] ^= 1;
        assert!(problem(&crc).contains("data checksum mismatch"));
        assert!(from_bytes(&bytes).is_ok());
    }

    /// The version-1 file of a pool: the version-2 bytes without the calibration block, with
    /// the version field and the header checksum rewritten.
    fn as_version_1(v2: &[u8]) -> Vec<u8> {
        let mut b = v2[..v2.len() - CALIBRATION_LEN].to_vec();
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32fast::hash(&b[..72]);
        b[72..76].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn version_1_files_load_with_an_empty_calibration() {
        let p = sample();
        assert_ne!(p.calibration(), &Calibration::default());
        let old = from_bytes(&as_version_1(&to_bytes(&p))).unwrap();
        assert_eq!(old.calibration(), &Calibration::default());
        assert_eq!(old.prior(), p.prior());
        assert_eq!(old.updates(), p.updates());
        let ids: Vec<i64> = p.ids();
        assert_eq!(old.evidence(&ids), p.evidence(&ids));
        // Saved again, it is a version-2 file.
        assert_eq!(le_u32(&to_bytes(&old)[8..]), VERSION);
        let mut short = as_version_1(&to_bytes(&p));
        short.push(0);
        assert!(problem(&short).contains("1 unexpected bytes"));
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let err = load(Path::new("/nonexistent-dir/pool.bin")).unwrap_err();
        assert!(
            matches!(err, Error::Io { ref source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
    }
}
