//! Versioned binary file format of a [`PassRatePool`], and its atomic save.
//!
//! Layout, all little-endian:
//!
//! | offset | size | field                                                        |
//! |-------:|-----:|--------------------------------------------------------------|
//! |      0 |    8 | magic `b"DYNMPOOL"`                                          |
//! |      8 |    4 | format version (u32) = 3 (versions 1 and 2 are read too)     |
//! |     12 |    4 | flags (u32), 0; reserved                                     |
//! |     16 |    8 | prior α0 (f64)                                               |
//! |     24 |    8 | prior β0 (f64)                                               |
//! |     32 |    8 | forgetting factor ρ (f64)                                    |
//! |     40 |    8 | global evidence scale g (f64)                                |
//! |     48 |    8 | number of updates (u64)                                      |
//! |     56 |    8 | number of prompts P (u64)                                    |
//! |     64 |    8 | hash-table slots when saved (u64; a sizing hint)             |
//! |     72 |    4 | CRC-32 of bytes 0..72 (u32)                                  |
//! |     76 | 24·P | records: id (i64), stored successes (f32), failures (f32),   |
//! |        |      | noise sums over successes (f32), over failures (f32)         |
//! | 76+24P |    4 | CRC-32 of the records (u32)                                  |
//! | 80+24P | 2728 | the revisit calibration (`calibration.rs`): forget (f64),    |
//! |        |      | weight τ (f64), cells C = 169 (u32), C × observed (f64),     |
//! |        |      | C × predicted (f64), CRC-32 of the block before it (u32)     |
//! | …+2728 |   48 | the noise totals (`pool::NoiseTotals`): weight w0 (f64),     |
//! |        |      | started classes (u32: bit 0 success, bit 1 failure), stored  |
//! |        |      | sums of q (2 × f64), stored class counts (2 × f64), CRC-32   |
//! |        |      | of the block before it (u32)                                 |
//!
//! Earlier versions load with empty noise statistics (no class started, w0 = 1): version 2
//! has 16-byte records (id, successes, failures) and no noise block; version 1 has no
//! calibration block either (it loads with an empty calibration, every factor 1).
//!
//! Stored values are actual values divided by g, exactly as held in memory, so a round trip
//! is bit for bit. A file is refused (with the reason) when it is empty, foreign (bad magic),
//! of another version, truncated, longer than its header says, or fails a checksum.

use crate::calibration::{Calibration, CELLS};
use crate::error::{Error, Result};
use crate::pool::{NoiseTotals, PassRatePool, Slot};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub const MAGIC: &[u8; 8] = b"DYNMPOOL";
pub const VERSION: u32 = 3;
pub const HEADER_LEN: usize = 76;
/// Record length of the current version (id, evidence, noise sums).
pub const RECORD_LEN: usize = 24;
/// Record length of versions 1 and 2 (id, evidence).
const OLD_RECORD_LEN: usize = 16;
/// Length of the calibration block (versions 2 and 3).
pub const CALIBRATION_LEN: usize = 8 + 8 + 4 + 16 * CELLS + 4;
/// Length of the noise block (version 3).
pub const NOISE_LEN: usize = 8 + 4 + 4 * 8 + 4;
/// Records converted per buffer when reading or writing.
const BATCH: usize = 1 << 16;

/// Size in bytes of the file holding `prompts` prompts.
pub fn file_len(prompts: u64) -> u64 {
    HEADER_LEN as u64 + RECORD_LEN as u64 * prompts + 4 + (CALIBRATION_LEN + NOISE_LEN) as u64
}

fn noise_block(n: &NoiseTotals) -> Vec<u8> {
    let mut b = Vec::with_capacity(NOISE_LEN);
    b.extend_from_slice(&n.weight.to_le_bytes());
    let flags = n.started[0] as u32 | (n.started[1] as u32) << 1;
    b.extend_from_slice(&flags.to_le_bytes());
    for x in n.sum.iter().chain(&n.count) {
        b.extend_from_slice(&x.to_le_bytes());
    }
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

fn parse_noise(b: &[u8]) -> std::result::Result<NoiseTotals, String> {
    if crc32fast::hash(&b[..NOISE_LEN - 4]) != le_u32(&b[NOISE_LEN - 4..]) {
        return Err("noise checksum mismatch (the noise block is corrupt)".into());
    }
    let flags = le_u32(&b[8..]);
    if flags > 3 {
        return Err(format!("noise block has unknown class flags {flags:#x}"));
    }
    let n = NoiseTotals {
        weight: le_f64(&b[0..]),
        started: [flags & 1 != 0, flags & 2 != 0],
        sum: [le_f64(&b[12..]), le_f64(&b[20..])],
        count: [le_f64(&b[28..]), le_f64(&b[36..])],
    };
    if !n.is_valid() {
        return Err("the noise block holds invalid values".into());
    }
    Ok(n)
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
        buf.extend_from_slice(&e.noise_success.to_le_bytes());
        buf.extend_from_slice(&e.noise_failure.to_le_bytes());
        if buf.len() == BATCH * RECORD_LEN {
            flush(&mut buf, w)?;
        }
    }
    flush(&mut buf, w)?;
    w.write_all(&crc.finalize().to_le_bytes())?;
    w.write_all(&calibration_block(pool.calibration()))?;
    w.write_all(&noise_block(pool.noise_totals()))
}

/// Writes the file format into `buf`, which must be exactly `file_len(pool.len())` bytes
/// long. The caller owns the memory (e.g. a Python `bytes` object), so the pool's bytes exist
/// once; the result equals `to_bytes(pool)`. A buffer of another length is refused.
pub fn write_into(pool: &PassRatePool, buf: &mut [u8]) -> Result<()> {
    let want = file_len(pool.len() as u64);
    if buf.len() as u64 != want {
        return Err(Error::invalid(format!(
            "buffer is {} bytes, but the file format of a pool of {} prompts is {want} bytes",
            buf.len(),
            pool.len()
        )));
    }
    let mut w: &mut [u8] = buf;
    // A slice writer fails only when the pool writes more than `file_len` says.
    write_pool(pool, &mut w)
        .map_err(|e| Error::invalid(format!("pool wrote more than its file length: {e}")))?;
    if !w.is_empty() {
        return Err(Error::invalid(format!(
            "pool wrote {} bytes less than its file length {want}",
            w.len()
        )));
    }
    Ok(())
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
    let tail_len = match version {
        1 => 0,
        2 => CALIBRATION_LEN,
        _ => CALIBRATION_LEN + NOISE_LEN,
    } as u64;
    let record_len = if version >= 3 {
        RECORD_LEN
    } else {
        OLD_RECORD_LEN
    };
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
        .checked_mul(record_len as u64)
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
    let mut buf = vec![0u8; BATCH * record_len];
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
        let chunk = &mut buf[..take * record_len];
        r.read_exact(chunk).map_err(truncated)?;
        crc.update(chunk);
        for rec in chunk.chunks_exact(record_len) {
            let f32_at = |at: usize| f32::from_le_bytes(rec[at..at + 4].try_into().unwrap());
            let mut slot = Slot::evidence(
                i64::from_le_bytes(rec[0..8].try_into().unwrap()),
                f32_at(8),
                f32_at(12),
            );
            if record_len == RECORD_LEN {
                (slot.noise_success, slot.noise_failure) = (f32_at(16), f32_at(20));
            }
            let valid = |x: f32| x.is_finite() && x >= 0.0;
            if problem.is_none() {
                if !(valid(slot.successes) && valid(slot.failures)) {
                    problem = Some(format!(
                        "record {record} (id {}) has invalid evidence",
                        slot.id
                    ));
                } else if !(valid(slot.noise_success) && valid(slot.noise_failure)) {
                    problem = Some(format!(
                        "record {record} (id {}) has invalid noise sums",
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
    if version >= 3 {
        let mut block = vec![0u8; NOISE_LEN];
        r.read_exact(&mut block).map_err(truncated)?;
        let n = parse_noise(&block).map_err(bad)?;
        pool.set_noise_totals(n)
            .map_err(|e| bad(format!("invalid noise statistics: {e}")))?;
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
    use crate::pool::NoiseRows;

    fn sample() -> PassRatePool {
        let mut p = PassRatePool::new(0.7, 1.3, 0.9, 0).unwrap();
        for step in 0..30i64 {
            let ids: Vec<i64> = (0..100)
                .map(|i| i * 7919 + step % 3)
                .chain([i64::MIN])
                .collect();
            let trials: Vec<i64> = ids.iter().map(|&i| 1 + (i.rem_euclid(16))).collect();
            let succ: Vec<i64> = trials.iter().map(|&t| t / 3).collect();
            // Noise sums from step 10 on (steps before are imputed when the classes start).
            let qs: Vec<f64> = succ.iter().map(|&k| k as f64 * 0.75).collect();
            let qf: Vec<f64> = (0..ids.len())
                .map(|j| (trials[j] - succ[j]) as f64 * (1.5 + j as f64 / 64.0))
                .collect();
            let noise = (step >= 10).then_some(NoiseRows {
                success: &qs,
                failure: &qf,
            });
            p.update_with_noise(&ids, &succ, &trials, noise).unwrap();
        }
        p.set_noise_weight(2.5).unwrap();
        p
    }

    fn same(a: &PassRatePool, b: &PassRatePool) {
        assert_eq!(a.prior(), b.prior());
        assert_eq!(a.forget().to_bits(), b.forget().to_bits());
        assert_eq!(a.scale().to_bits(), b.scale().to_bits());
        assert_eq!(a.updates(), b.updates());
        assert_eq!(a.calibration(), b.calibration());
        assert_eq!(a.noise_totals(), b.noise_totals());
        let bits = |s: Slot| {
            (
                s.id,
                s.successes.to_bits(),
                s.failures.to_bits(),
                s.noise_success.to_bits(),
                s.noise_failure.to_bits(),
            )
        };
        let mut ea: Vec<_> = a.stored_entries().map(bits).collect();
        let mut eb: Vec<_> = b.stored_entries().map(bits).collect();
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

    #[test]
    fn write_into_gives_the_bytes_of_to_bytes_and_refuses_other_lengths() {
        for p in [sample(), PassRatePool::new(1.0, 1.0, 1.0, 0).unwrap()] {
            let want = to_bytes(&p);
            let mut buf = vec![0xAAu8; file_len(p.len() as u64) as usize];
            write_into(&p, &mut buf).unwrap();
            assert_eq!(buf, want);
            for len in [want.len() - 1, want.len() + 1, 0] {
                let mut other = vec![0u8; len];
                let err = write_into(&p, &mut other).unwrap_err();
                assert!(matches!(err, Error::InvalidArgument(_)));
                assert_eq!(
                    err.to_string(),
                    format!(
                        "buffer is {len} bytes, but the file format of a pool of {} prompts is {} bytes",
                        p.len(),
                        want.len()
                    )
                );
            }
        }
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
        let mut v4 = bytes.clone();
        v4[8] = 4;
        assert!(problem(&v4).contains("unsupported format version 4"));
        let mut noise = bytes.clone();
        let at = noise.len() - 20;
        noise[at] ^= 1;
        assert!(problem(&noise).contains("noise checksum mismatch"));
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
        let records_end = bytes.len() - CALIBRATION_LEN - NOISE_LEN - 1;
        crc[records_end] ^= 1;
        assert!(problem(&crc).contains("data checksum mismatch"));
        assert!(from_bytes(&bytes).is_ok());
    }

    /// The version-2 file of a pool (what the previous build wrote): 16-byte records without
    /// the noise sums, no noise block; version field and checksums rewritten.
    fn as_version_2(v3: &[u8]) -> Vec<u8> {
        let prompts = le_u64(&v3[56..]) as usize;
        let mut b = v3[..HEADER_LEN].to_vec();
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32fast::hash(&b[..72]);
        b[72..76].copy_from_slice(&crc.to_le_bytes());
        let records = &v3[HEADER_LEN..HEADER_LEN + RECORD_LEN * prompts];
        for rec in records.chunks_exact(RECORD_LEN) {
            b.extend_from_slice(&rec[..16]);
        }
        let crc = crc32fast::hash(&b[HEADER_LEN..]);
        b.extend_from_slice(&crc.to_le_bytes());
        let at = HEADER_LEN + RECORD_LEN * prompts + 4;
        b.extend_from_slice(&v3[at..at + CALIBRATION_LEN]);
        b
    }

    /// The version-1 file of a pool: the version-2 bytes without the calibration block, with
    /// the version field and the header checksum rewritten.
    fn as_version_1(v3: &[u8]) -> Vec<u8> {
        let v2 = as_version_2(v3);
        let mut b = v2[..v2.len() - CALIBRATION_LEN].to_vec();
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32fast::hash(&b[..72]);
        b[72..76].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn version_2_files_load_with_empty_noise_statistics() {
        let p = sample();
        assert!(p.noise_means().iter().all(|m| m.is_some()));
        let old = from_bytes(&as_version_2(&to_bytes(&p))).unwrap();
        assert_eq!(old.noise_totals(), &NoiseTotals::default());
        assert_eq!(old.calibration(), p.calibration());
        assert_eq!(old.prior(), p.prior());
        assert_eq!(old.updates(), p.updates());
        assert_eq!(old.scale().to_bits(), p.scale().to_bits());
        let ids: Vec<i64> = p.ids();
        assert_eq!(old.evidence(&ids), p.evidence(&ids));
        assert_eq!(old.noise_sums(&ids).0, vec![0.0; ids.len()]);
        assert_eq!(old.noise_scale(&ids), vec![1.0; ids.len()]);
        // Saved again, it is a version-3 file.
        assert_eq!(le_u32(&to_bytes(&old)[8..]), VERSION);
        let mut long = as_version_2(&to_bytes(&p));
        long.push(0);
        assert!(problem(&long).contains("1 unexpected bytes"));
    }

    #[test]
    fn version_1_files_load_with_an_empty_calibration() {
        let p = sample();
        assert_ne!(p.calibration(), &Calibration::default());
        let old = from_bytes(&as_version_1(&to_bytes(&p))).unwrap();
        assert_eq!(old.calibration(), &Calibration::default());
        assert_eq!(old.noise_totals(), &NoiseTotals::default());
        assert_eq!(old.prior(), p.prior());
        assert_eq!(old.updates(), p.updates());
        let ids: Vec<i64> = p.ids();
        assert_eq!(old.evidence(&ids), p.evidence(&ids));
        let mut short = as_version_1(&to_bytes(&p));
        short.push(0);
        assert!(problem(&short).contains("1 unexpected bytes"));
    }

    #[test]
    fn round_trip_keeps_the_noise_scale() {
        let p = sample();
        let q = from_bytes(&to_bytes(&p)).unwrap();
        let ids: Vec<i64> = p.ids().into_iter().chain([5, -5]).collect();
        let (a, b) = (p.noise_scale(&ids), q.noise_scale(&ids));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert_eq!(q.noise_weight(), 2.5);
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let err = load(Path::new("/nonexistent-dir/pool.bin")).unwrap_err();
        assert!(
            matches!(err, Error::Io { ref source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
    }
}
