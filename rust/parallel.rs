//! Chunked map helpers: O(N) passes run on the rayon pool for large inputs and inline below
//! that, where thread hand-off would cost more than the pass itself.

use rayon::prelude::*;

/// Inputs shorter than this are processed on the calling thread.
pub const PARALLEL_MIN_LEN: usize = 1 << 16;
/// Work unit for parallel passes: large enough to amortise scheduling, small enough to balance.
pub const CHUNK_LEN: usize = 1 << 14;

pub fn use_parallel(len: usize) -> bool {
    len >= PARALLEL_MIN_LEN && rayon::current_num_threads() > 1
}

/// Chunks are `CHUNK_LEN` long when run in parallel and the whole input otherwise; either way
/// `offset / CHUNK_LEN` is the chunk's position in the returned vector.
///
/// Applies `f(offset, chunk)` to consecutive chunks of `xs`; results come back in chunk order.
pub fn map_chunks<T, R, F>(xs: &[T], f: F) -> Vec<R>
where
    T: Sync,
    R: Send,
    F: Fn(usize, &[T]) -> R + Sync + Send,
{
    if use_parallel(xs.len()) {
        xs.par_chunks(CHUNK_LEN)
            .enumerate()
            .map(|(c, chunk)| f(c * CHUNK_LEN, chunk))
            .collect()
    } else {
        vec![f(0, xs)]
    }
}

/// Like [`map_chunks`], also handing each call the matching chunk of `out` (same length as `xs`).
pub fn map_chunks_mut<T, O, R, F>(xs: &[T], out: &mut [O], f: F) -> Vec<R>
where
    T: Sync,
    O: Send,
    R: Send,
    F: Fn(usize, &[T], &mut [O]) -> R + Sync + Send,
{
    debug_assert_eq!(xs.len(), out.len());
    if use_parallel(xs.len()) {
        xs.par_chunks(CHUNK_LEN)
            .zip(out.par_chunks_mut(CHUNK_LEN))
            .enumerate()
            .map(|(c, (chunk, out_chunk))| f(c * CHUNK_LEN, chunk, out_chunk))
            .collect()
    } else {
        vec![f(0, xs, out)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_input_in_order() {
        for len in [0usize, 1, 5, PARALLEL_MIN_LEN + 3 * CHUNK_LEN + 7] {
            let xs: Vec<u64> = (0..len as u64).collect();
            let sums: u64 = map_chunks(&xs, |_, c| c.iter().sum::<u64>())
                .into_iter()
                .sum();
            assert_eq!(sums, xs.iter().sum::<u64>());
            let offsets_ok = map_chunks(&xs, |off, c| c.first().is_none_or(|&x| x == off as u64));
            assert!(offsets_ok.into_iter().all(|ok| ok));
            let mut out = vec![0u64; len];
            map_chunks_mut(&xs, &mut out, |off, c, o| {
                for (j, (x, y)) in c.iter().zip(o.iter_mut()).enumerate() {
                    *y = x + (off + j) as u64;
                }
            });
            assert!(out.iter().enumerate().all(|(i, &y)| y == 2 * i as u64));
        }
    }
}
