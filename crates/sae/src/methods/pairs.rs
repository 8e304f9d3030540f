//! The sparse co-activation engine shared by both methods.
//!
//! Both research penalties only involve pairs of latents that fire on the same token.
//! With TopK codes a batch of B rows has `B * k * (k - 1) / 2` unordered pair events,
//! against `F^2` entries for the dense formula. Each row's firing latents are sorted by
//! index once, so the partners `j > i` of latent `i` in a row are the entries after
//! `i`'s own position. Per latent `i` we compute the upper-triangular sparse row `i` of
//! `M^T M` (co-firing counts) and `F^T F` (activation dot products) with Gustavson's
//! algorithm: walk the rows where `i` fires (a CSC transpose) and scatter the later
//! entries into a dense per-thread accumulator of length F (cache-resident at
//! F = 16384). A pair's gradient then flows to both of its code values in the same
//! pass. Latents are processed in 16 fixed contiguous chunks in parallel; each chunk has
//! its own gradient buffer and the buffers are summed in chunk order, so results are
//! bit-for-bit identical for any number of threads.
//!
//! [`PairEma`] keeps exponential moving averages of per-pair statistics in sparse,
//! bounded memory (see its docs for the eviction rule).

use crate::codes::SparseCodes;
use rayon::prelude::*;

/// The non-zero entries of a batch of codes, rows sorted by latent index, plus their
/// per-latent (CSC) transpose. Entries with value exactly 0 are "not firing" and left out.
#[derive(Clone, Debug, Default)]
pub struct Csc {
    pub d_sae: usize,
    pub rows: usize,
    /// Row `r`'s sorted entries are `row_off[r]..row_off[r + 1]` of `idx`/`val`.
    pub row_off: Vec<usize>,
    pub idx: Vec<u32>,
    pub val: Vec<f32>,
    /// Position of each sorted entry in the original `codes.val`.
    pub orig: Vec<u32>,
    /// Latent `i`'s entries are `col_off[i]..col_off[i + 1]` of `col_pos`, which holds
    /// positions into the sorted arrays (ascending rows).
    pub col_off: Vec<usize>,
    pub col_pos: Vec<u32>,
    /// `row_end[p]`: end of the row that sorted position `p` belongs to.
    pub row_end: Vec<u32>,
}

impl Csc {
    pub fn build(codes: &SparseCodes) -> Csc {
        let f = codes.d_sae;
        let mut row_off = Vec::with_capacity(codes.rows + 1);
        row_off.push(0);
        let nnz_max = codes.nnz();
        let (mut idx, mut val, mut orig) = (
            Vec::with_capacity(nnz_max),
            Vec::with_capacity(nnz_max),
            Vec::with_capacity(nnz_max),
        );
        let mut row: Vec<(u32, f32, u32)> = Vec::new();
        for r in 0..codes.rows {
            row.clear();
            for p in codes.offsets[r]..codes.offsets[r + 1] {
                if codes.val[p] != 0.0 {
                    row.push((codes.idx[p], codes.val[p], p as u32));
                }
            }
            row.sort_unstable_by_key(|e| e.0);
            for &(i, v, p) in &row {
                idx.push(i);
                val.push(v);
                orig.push(p);
            }
            row_off.push(idx.len());
        }
        let nnz = idx.len();
        let mut col_off = vec![0usize; f + 1];
        for &i in &idx {
            col_off[i as usize + 1] += 1;
        }
        for i in 0..f {
            col_off[i + 1] += col_off[i];
        }
        let mut fill = col_off.clone();
        let mut col_pos = vec![0u32; nnz];
        let mut row_end = vec![0u32; nnz];
        for r in 0..codes.rows {
            for p in row_off[r]..row_off[r + 1] {
                let i = idx[p] as usize;
                col_pos[fill[i]] = p as u32;
                fill[i] += 1;
                row_end[p] = row_off[r + 1] as u32;
            }
        }
        Csc {
            d_sae: f,
            rows: codes.rows,
            row_off,
            idx,
            val,
            orig,
            col_off,
            col_pos,
            row_end,
        }
    }

    /// Number of rows in which latent `i` fires.
    #[inline]
    pub fn count(&self, i: usize) -> usize {
        self.col_off[i + 1] - self.col_off[i]
    }

    /// Sorted positions of latent `i`'s entries.
    #[inline]
    pub fn col(&self, i: usize) -> &[u32] {
        &self.col_pos[self.col_off[i]..self.col_off[i + 1]]
    }

    /// Euclidean norm of each latent's activation column (f64 accumulation).
    pub fn col_norms(&self) -> Vec<f32> {
        (0..self.d_sae)
            .map(|i| {
                self.col(i)
                    .iter()
                    .map(|&p| (self.val[p as usize] as f64).powi(2))
                    .sum::<f64>()
                    .sqrt() as f32
            })
            .collect()
    }
}

/// Per-thread dense accumulators of length F, reset after each latent by walking only
/// the touched entries (so a latent costs O(its pair events), not O(F)).
pub struct Scratch {
    /// `(count, dot)` per latent, interleaved so one access touches one cache line.
    pub acc: Vec<(u32, f32)>,
    /// Per-partner gradient weight set by the method between the two passes.
    pub w: Vec<f32>,
    pub touched: Vec<u32>,
    pub ema_val: Vec<[f32; 2]>,
}

impl Scratch {
    pub fn new(f: usize) -> Scratch {
        Scratch {
            acc: vec![(0, 0.0); f],
            w: vec![0.0; f],
            touched: Vec::with_capacity(1024),
            ema_val: vec![[0.0; 2]; f],
        }
    }

    /// Upper-triangular sparse row `i` of `M^T M` and `F^T F`: for every latent `j > i`
    /// co-firing with `i` (and `j == i` when `diag`), `acc[j] = (number of rows where
    /// both fire, sum over those rows of f_i * f_j)`. Touched latents are listed in
    /// `touched` in first-touch order (deterministic).
    pub fn accumulate(&mut self, i: usize, csc: &Csc, diag: bool) {
        debug_assert!(self.touched.is_empty());
        for &p in csc.col(i) {
            let p = p as usize;
            let vi = csc.val[p];
            let from = if diag { p } else { p + 1 };
            let end = csc.row_end[p] as usize;
            for (&j, &vj) in csc.idx[from..end].iter().zip(&csc.val[from..end]) {
                let a = &mut self.acc[j as usize];
                if a.0 == 0 {
                    self.touched.push(j);
                }
                a.0 += 1;
                a.1 += vi * vj;
            }
        }
    }

    /// Gradient of `sum_(j >= i) w[j] f_i^T f_j` (with `w` set for the touched `j`)
    /// with respect to the code values of `i` and of its partners, added into `grad`
    /// (indexed by sorted position).
    pub fn scatter_grad(&self, i: usize, csc: &Csc, diag: bool, grad: &mut [f32]) {
        for &p in csc.col(i) {
            let p = p as usize;
            let vi = csc.val[p];
            let from = if diag { p } else { p + 1 };
            let end = csc.row_end[p] as usize;
            let mut gi = 0f32;
            let partners = csc.idx[from..end].iter().zip(&csc.val[from..end]);
            for (g, (&j, &vj)) in grad[from..end].iter_mut().zip(partners) {
                let w = self.w[j as usize];
                gi += w * vj;
                *g += w * vi;
            }
            grad[p] += gi;
        }
    }

    /// Zero the accumulators of the touched latents and clear the list.
    pub fn reset(&mut self) {
        for &j in &self.touched {
            let j = j as usize;
            self.acc[j] = (0, 0.0);
            self.w[j] = 0.0;
        }
        self.touched.clear();
    }
}

thread_local! {
    /// Each rayon worker keeps its O(F) scratch between steps (allocating and zeroing
    /// ~0.4 MB per chunk per step was a measurable share of the penalty's time). The
    /// scratch is always left reset (accumulators zero).
    static SCRATCH: std::cell::RefCell<Option<Scratch>> = const { std::cell::RefCell::new(None) };
}

fn with_scratch<R>(f: usize, body: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().map(|s| s.acc.len()) != Some(f) {
            *slot = Some(Scratch::new(f));
        }
        body(slot.as_mut().expect("scratch just set"))
    })
}

/// Number of fixed latent chunks (independent of the thread count, for determinism).
pub const CHUNKS: usize = 16;

/// Run `visit(scratch, i, list)` for every firing latent `i` after
/// [`Scratch::accumulate`]; `visit` sets `scratch.w[j]` for the touched `j` when a
/// gradient is wanted. Returns the per-latent results in latent order and, when
/// `want_grad`, the gradient indexed by sorted position (see [`Csc::orig`]).
pub fn run_latents<R: Send>(
    csc: &Csc,
    lists: Option<&mut [PairTable]>,
    diag: bool,
    want_grad: bool,
    visit: impl Fn(&mut Scratch, usize, Option<&mut PairTable>) -> R + Sync,
) -> (Vec<R>, Vec<f32>) {
    let f = csc.d_sae;
    let nnz = csc.idx.len();
    let per = f.div_ceil(CHUNKS).max(1);
    let mut chunk_lists: Vec<Option<&mut [PairTable]>> = Vec::with_capacity(CHUNKS);
    match lists {
        Some(l) => {
            assert_eq!(l.len(), f, "pair statistics built for another d_sae");
            for c in l.chunks_mut(per) {
                chunk_lists.push(Some(c));
            }
        }
        None => chunk_lists.extend((0..f.div_ceil(per)).map(|_| None)),
    }
    let outs: Vec<(Vec<R>, Vec<f32>)> = chunk_lists
        .into_par_iter()
        .enumerate()
        .map(|(c, mut lists)| {
            let lo = c * per;
            let hi = (lo + per).min(f);
            with_scratch(f, |s| {
                let mut grad = vec![0f32; if want_grad { nnz } else { 0 }];
                let mut res = Vec::new();
                for i in lo..hi {
                    if csc.count(i) == 0 {
                        continue;
                    }
                    s.accumulate(i, csc, diag);
                    let list = lists.as_mut().map(|l| &mut l[i - lo]);
                    res.push(visit(s, i, list));
                    if want_grad {
                        s.scatter_grad(i, csc, diag, &mut grad);
                    }
                    s.reset();
                }
                (res, grad)
            })
        })
        .collect();
    let mut grad = vec![0f32; if want_grad { nnz } else { 0 }];
    let mut res = Vec::new();
    for (r, g) in outs {
        res.extend(r);
        if want_grad {
            grad.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
        }
    }
    (res, grad)
}

/// Ordered co-firing pair events of a batch: `sum_r nnz_r (nnz_r - 1)`. With TopK codes
/// this is `B k (k - 1)`; with the dense codes of a ReLU SAE early in training it is
/// `B L0^2` (5 billion at B = 2048, L0 = 1600), where the pair engine would cost seconds
/// per step.
pub fn pair_events(codes: &SparseCodes) -> u64 {
    (0..codes.rows)
        .map(|r| {
            let n = (codes.offsets[r + 1] - codes.offsets[r]) as u64;
            n * n.saturating_sub(1)
        })
        .sum()
}

/// The rows `0, stride, 2 stride, ...` of `codes`: the deterministic row sample the
/// pair statistics use when a batch has more pair events than their budget.
pub fn row_sample(codes: &SparseCodes, stride: usize) -> SparseCodes {
    let stride = stride.max(1);
    let rows: Vec<usize> = (0..codes.rows).step_by(stride).collect();
    let nnz = rows
        .iter()
        .map(|&r| codes.offsets[r + 1] - codes.offsets[r])
        .sum();
    let mut out = SparseCodes::with_capacity(rows.len(), codes.d_sae, nnz);
    for r in rows {
        let (idx, val) = codes.row(r);
        out.push_row(idx.iter().copied().zip(val.iter().copied()));
    }
    out
}

/// One latent's stored pairs: an open-addressing hash table keyed by the partner `j`
/// (linear probing, capacity a power of two, empty slots marked by `j = u32::MAX`), so
/// an update touches only the batch's partners, not every stored pair. Entries are
/// never removed one by one: a table is rebuilt without its dead entries when it
/// fills to half its capacity, to a quarter-full capacity, so the O(capacity) rebuild
/// is paid once per O(capacity) insertions.
#[derive(Clone, Debug, Default)]
pub struct PairTable {
    slots: Vec<PairEntry>,
    len: usize,
}

const EMPTY: u32 = u32::MAX;

impl PairTable {
    /// Stored entries (including dead ones not yet dropped by a rebuild).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Allocated slots (16 bytes each).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The stored entries, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = &PairEntry> {
        self.slots.iter().filter(|e| e.j != EMPTY)
    }

    pub fn clear(&mut self) {
        *self = PairTable::default();
    }

    /// Fibonacci hashing: the top bits of `j * 2^32 / phi` (the capacity is a power
    /// of two, at least 16).
    #[inline]
    fn home(j: u32, bits: u32) -> usize {
        (j.wrapping_mul(0x9E37_79B1) >> (32 - bits)) as usize
    }

    /// The slot holding `j`, or the empty slot where it would go (`false`). The table
    /// must have at least one empty slot.
    #[inline]
    fn probe(&self, j: u32) -> (usize, bool) {
        let mask = self.slots.len() - 1;
        let mut s = Self::home(j, self.slots.len().trailing_zeros());
        loop {
            let k = self.slots[s].j;
            if k == j {
                return (s, true);
            }
            if k == EMPTY {
                return (s, false);
            }
            s = (s + 1) & mask;
        }
    }

    /// The entry of `j`, if stored.
    pub fn get(&self, j: u32) -> Option<&PairEntry> {
        if self.len == 0 {
            return None;
        }
        match self.probe(j) {
            (s, true) => Some(&self.slots[s]),
            _ => None,
        }
    }

    /// Keep the entries for which `keep` holds, in a table sized for them plus `extra`
    /// insertions at a load of at most 1/4; returns the number dropped.
    pub fn rebuild(&mut self, extra: usize, mut keep: impl FnMut(&PairEntry) -> bool) -> usize {
        let old = std::mem::take(&mut self.slots);
        let before = self.len;
        let kept: Vec<PairEntry> = old
            .into_iter()
            .filter(|e| e.j != EMPTY && keep(e))
            .collect();
        self.len = 0;
        let want = 4 * (kept.len() + extra);
        if want > 0 {
            self.slots = vec![
                PairEntry {
                    j: EMPTY,
                    last: 0,
                    v: [0.0; 2],
                };
                want.next_power_of_two().max(16)
            ];
        }
        for e in kept {
            let (s, _) = self.probe(e.j);
            self.slots[s] = e;
            self.len += 1;
        }
        before - self.len
    }

    /// Insert an entry whose partner is not stored yet (room must have been made).
    fn insert_at(&mut self, slot: usize, e: PairEntry) {
        debug_assert_eq!(self.slots[slot].j, EMPTY);
        self.slots[slot] = e;
        self.len += 1;
    }

    /// A table holding exactly `entries` (distinct partners).
    pub fn from_entries(entries: Vec<PairEntry>) -> PairTable {
        let mut t = PairTable {
            slots: entries,
            len: 0,
        };
        t.len = t.slots.len();
        t.rebuild(0, |_| true);
        t
    }
}

/// Equal when both hold the same entries (slot layout aside).
impl PartialEq for PairTable {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().all(|e| other.get(e.j) == Some(e))
    }
}

const PEMA_MAGIC: &[u8] = b"SAELAB-PAIR-EMA1";

/// One stored pair statistic, in the list of its first latent `i`: `v` holds two
/// values (e.g. `[n_ij, n_ji]`), `last` the update index at which they were written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairEntry {
    pub j: u32,
    pub last: u32,
    pub v: [f32; 2],
}

/// Exponential moving averages of pair statistics, sparse and bounded.
///
/// Semantics: identical to the dense EMA `e_t = m e_(t-1) + (1 - m) x_t` over all F x F
/// pairs where `x_t = 0` for pairs absent from the batch, initialised with the first
/// batch (`e_1 = x_1`). Storage: per latent `i`, a list of entries for the latents
/// `j >= i` it has co-fired with (each unordered pair once, in the list of its smaller
/// latent, with both ordered values), so a latent's update needs no other latent's list
/// and latents update in parallel. Absent pairs decay lazily: a value written at update
/// `L` reads `v * m^(t - L)` at update `t`.
///
/// Eviction (bounded memory):
/// 1. an entry whose decayed value (the larger of its two numbers) is below `epsilon`
///    reads as 0 and is dropped when its latent's table is next rebuilt (see
///    [`PairTable`]: when the table is half full);
/// 2. when the total number of entries exceeds `max_entries`, the smallest decayed
///    entries are dropped until about `3/4 * max_entries` remain (exactly, below 256k
///    entries; above, the cutoff value is estimated from a strided sample of 256k
///    entries, so the count kept is within sampling error of the target). The
///    hysteresis makes the O(entries) pass rarer.
///
/// Memory: 16 bytes per slot and at most 4 slots per entry right after a rebuild
/// (2 when a table is due for one), so `max_entries = 8_000_000` stays below 512 MB
/// (the stored entries count the dead ones not yet dropped, so the bound holds).
#[derive(Clone, Debug)]
pub struct PairEma {
    pub lists: Vec<PairTable>,
    pub momentum: f32,
    pub epsilon: f32,
    pub max_entries: usize,
    /// Number of completed updates; the current update's index while updating.
    pub t: u32,
    /// Total evictions by rule 2 (for the metrics log).
    pub evicted: u64,
}

impl PairEma {
    pub fn new(f: usize, momentum: f32, epsilon: f32, max_entries: usize) -> PairEma {
        PairEma {
            lists: vec![PairTable::default(); f],
            momentum,
            epsilon,
            max_entries,
            t: 0,
            evicted: 0,
        }
    }

    pub fn entries(&self) -> usize {
        self.lists.iter().map(|l| l.len()).sum()
    }

    #[inline]
    fn decay(&self, e: &PairEntry, now: u32) -> [f32; 2] {
        let f = self.momentum.powi((now - e.last) as i32);
        [e.v[0] * f, e.v[1] * f]
    }

    /// Decayed value of an entry at the current update index (0 if below epsilon).
    #[inline]
    pub fn read(&self, e: &PairEntry) -> [f32; 2] {
        let d = self.decay(e, self.t);
        if d[0].max(d[1]) < self.epsilon {
            [0.0, 0.0]
        } else {
            d
        }
    }

    /// Update latent `i`'s table for update index `t` (the caller increments `t` once
    /// per batch via [`PairEma::begin`]). `touched` are the latents whose batch value is
    /// `batch(j)`; on return `scratch_val[j]` holds the new EMA for every touched `j`.
    /// Only the touched partners are looked up (the table is hashed by partner), so
    /// the cost is O(touched), plus an occasional rebuild that drops dead entries.
    /// Static helper so it can run on a `&mut` table while `self` is shared.
    pub fn update_list(
        momentum: f32,
        epsilon: f32,
        t: u32,
        table: &mut PairTable,
        touched: &[u32],
        scratch_val: &mut [[f32; 2]],
        mut batch: impl FnMut(u32) -> [f32; 2],
    ) {
        let m = momentum;
        // m^d by table for the usual small ages d (powi was a visible share of the time).
        let mut tbl = [1f32; 64];
        for d in 1..64 {
            tbl[d] = tbl[d - 1] * m;
        }
        let pow = |d: u32| {
            if (d as usize) < 64 {
                tbl[d as usize]
            } else {
                m.powi(d as i32)
            }
        };
        // Room for every touched partner at a load of at most 1/2; a rebuild drops the
        // entries that read as zero before this update (rule 1: they would be
        // treated as zero anyway, and their value only decays).
        if 2 * (table.len() + touched.len()) > table.capacity() {
            table.rebuild(touched.len(), |e| {
                e.v[0].max(e.v[1]) * pow((t - 1).saturating_sub(e.last)) >= epsilon
            });
        }
        for &j in touched {
            let b = batch(j);
            let (slot, found) = table.probe(j);
            if t > 1 && found {
                // Value after update t-1, then one EMA step with x_t = b.
                let e = &mut table.slots[slot];
                let f = pow(t - 1 - e.last);
                let mut prev = [e.v[0] * f, e.v[1] * f];
                if prev[0].max(prev[1]) < epsilon {
                    prev = [0.0, 0.0];
                }
                e.v = [
                    m * prev[0] + (1.0 - m) * b[0],
                    m * prev[1] + (1.0 - m) * b[1],
                ];
                e.last = t;
                scratch_val[j as usize] = e.v;
            } else {
                // First batch: e_1 = x_1; later, a new pair starts from 0.
                let new = if t == 1 {
                    b
                } else {
                    [(1.0 - m) * b[0], (1.0 - m) * b[1]]
                };
                scratch_val[j as usize] = new;
                if t == 1 || new[0].max(new[1]) >= epsilon {
                    table.insert_at(slot, PairEntry { j, last: t, v: new });
                }
            }
        }
    }

    /// Compact little-endian serialisation for checkpoints (JSON would be ~3x larger
    /// at millions of entries): magic, `t`, `evicted`, then per latent the entry count
    /// and its `(j, last, v0, v1)` entries.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + 4 * self.lists.len() + 16 * self.entries());
        out.extend_from_slice(PEMA_MAGIC);
        out.extend_from_slice(&(self.lists.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.t.to_le_bytes());
        out.extend_from_slice(&self.evicted.to_le_bytes());
        for l in &self.lists {
            out.extend_from_slice(&(l.len() as u32).to_le_bytes());
            for e in l.iter() {
                out.extend_from_slice(&e.j.to_le_bytes());
                out.extend_from_slice(&e.last.to_le_bytes());
                out.extend_from_slice(&e.v[0].to_le_bytes());
                out.extend_from_slice(&e.v[1].to_le_bytes());
            }
        }
        out
    }

    /// Restore the statistics written by [`PairEma::to_bytes`] (the hyper-parameters stay
    /// those of `self`); errors name what is wrong.
    pub fn load_bytes(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        use anyhow::{bail, Context};
        let mut r = bytes;
        let mut take = |n: usize| -> anyhow::Result<&[u8]> {
            if r.len() < n {
                bail!("pair statistics: saved state is truncated");
            }
            let (a, b) = r.split_at(n);
            r = b;
            Ok(a)
        };
        if take(PEMA_MAGIC.len())? != PEMA_MAGIC {
            bail!("pair statistics: saved state has the wrong format");
        }
        let u32_of = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        let n = u64::from_le_bytes(take(8)?.try_into().context("length")?) as usize;
        if n != self.lists.len() {
            bail!(
                "pair statistics: saved state has {n} latents, this run has {}",
                self.lists.len()
            );
        }
        let t = u32_of(take(4)?);
        let evicted = u64::from_le_bytes(take(8)?.try_into().context("evicted")?);
        let mut lists = Vec::with_capacity(n);
        for _ in 0..n {
            let len = u32_of(take(4)?) as usize;
            let raw = take(16 * len)?;
            let mut l = Vec::with_capacity(len);
            for e in raw.chunks_exact(16) {
                let j = u32_of(&e[0..4]);
                if j as usize >= n {
                    bail!("pair statistics: saved state names latent {j} >= {n}");
                }
                l.push(PairEntry {
                    j,
                    last: u32_of(&e[4..8]),
                    v: [
                        f32::from_bits(u32_of(&e[8..12])),
                        f32::from_bits(u32_of(&e[12..16])),
                    ],
                });
            }
            lists.push(PairTable::from_entries(l));
        }
        if !r.is_empty() {
            bail!(
                "pair statistics: {} unexpected trailing bytes in saved state",
                r.len()
            );
        }
        self.lists = lists;
        self.t = t;
        self.evicted = evicted;
        Ok(())
    }

    /// Start update `t + 1` (call once per batch before the per-latent updates).
    pub fn begin(&mut self) -> u32 {
        self.t += 1;
        self.t
    }

    /// Rule 2: enforce the entry bound after a batch's updates.
    pub fn enforce_bound(&mut self) {
        let total = self.entries();
        if total <= self.max_entries {
            return;
        }
        let target = self.max_entries * 3 / 4;
        let now = self.t;
        let m = self.momentum;
        let value = |e: &PairEntry| {
            let age = now - e.last;
            let f = if age < 64 {
                DECAY_TABLE.with(|t| t.factor(m, age))
            } else {
                m.powi(age as i32)
            };
            e.v[0].max(e.v[1]) * f
        };
        // The cutoff comes from a strided sample of at most ~256k entries: an exact
        // selection over millions of entries, run whenever the bound is reached (every
        // few steps at F = 16384), cost more than the penalty itself. Below the sample
        // size the selection is exact.
        let stride = total.div_ceil(SAMPLE).max(1);
        let mut sample: Vec<f32> = Vec::with_capacity(total / stride + 1);
        let mut skip = 0usize;
        for l in &self.lists {
            let mut k = skip;
            for e in l.iter().skip(skip).step_by(stride) {
                sample.push(value(e));
                k += stride;
            }
            skip = k.saturating_sub(l.len());
        }
        // Keep the `target` largest: cutoff = the (total - target)-th smallest value;
        // everything <= cutoff goes (ties go too).
        let k = ((total - target) * sample.len() / total).clamp(1, sample.len()) - 1;
        let (_, cut, _) = sample.select_nth_unstable_by(k, |a, b| a.total_cmp(b));
        let cut = *cut;
        let dropped: usize = self
            .lists
            .par_iter_mut()
            .with_min_len(256)
            .map(|l| l.rebuild(0, |e| value(e) > cut))
            .sum();
        self.evicted += dropped as u64;
    }
}

/// Sample size for the eviction cutoff of [`PairEma::enforce_bound`].
const SAMPLE: usize = 1 << 18;

/// `m^age` for ages below 64, per thread, rebuilt when the momentum changes.
struct DecayTable {
    m: std::cell::Cell<f32>,
    pow: std::cell::RefCell<[f32; 64]>,
}

impl DecayTable {
    fn factor(&self, m: f32, age: u32) -> f32 {
        if self.m.get() != m {
            let mut p = self.pow.borrow_mut();
            p[0] = 1.0;
            for d in 1..64 {
                p[d] = p[d - 1] * m;
            }
            self.m.set(m);
        }
        self.pow.borrow()[age as usize]
    }
}

thread_local! {
    static DECAY_TABLE: DecayTable = const {
        DecayTable {
            m: std::cell::Cell::new(f32::NAN),
            pow: std::cell::RefCell::new([1.0; 64]),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use saelab_core::rng::Rng;

    pub(crate) fn random_codes(rng: &mut Rng, rows: usize, f: usize, k: usize) -> SparseCodes {
        let mut c = SparseCodes::with_capacity(rows, f, rows * k);
        for _ in 0..rows {
            let mut perm = rng.permutation(f);
            perm.truncate(k);
            c.push_row(
                perm.into_iter()
                    .map(|i| (i as u32, 0.1 + rng.f32() * 2.0))
                    .collect::<Vec<_>>(),
            );
        }
        c
    }

    #[test]
    fn accumulate_and_scatter_match_dense_products() {
        let mut rng = Rng::new(5);
        let (b, f, k) = (37, 23, 5);
        let codes = random_codes(&mut rng, b, f, k);
        let dense = codes.to_dense();
        let csc = Csc::build(&codes);
        let mut s = Scratch::new(f);
        for diag in [false, true] {
            for i in 0..f {
                assert_eq!(
                    csc.count(i),
                    (0..b).filter(|&t| dense[t * f + i] != 0.0).count()
                );
                s.accumulate(i, &csc, diag);
                for j in 0..f {
                    let (mut c, mut d) = (0u32, 0f64);
                    if j > i || (diag && j == i) {
                        for t in 0..b {
                            let (a, bb) = (dense[t * f + i], dense[t * f + j]);
                            if a != 0.0 && bb != 0.0 {
                                c += 1;
                                d += a as f64 * bb as f64;
                            }
                        }
                    }
                    assert_eq!(s.acc[j].0, c);
                    assert!((s.acc[j].1 as f64 - d).abs() < 1e-4 * (1.0 + d.abs()));
                    assert_eq!(s.touched.contains(&(j as u32)), c > 0);
                }
                // Gradient of sum_j w_j f_i.f_j with w_j = j + 1 (j > i), by hand.
                for &j in &s.touched {
                    s.w[j as usize] = j as f32 + 1.0;
                }
                let mut g = vec![0f32; csc.idx.len()];
                s.scatter_grad(i, &csc, diag, &mut g);
                let mut gd = vec![0f64; b * f];
                for t in 0..b {
                    let fi = dense[t * f + i] as f64;
                    if fi == 0.0 {
                        continue;
                    }
                    for j in 0..f {
                        let fj = dense[t * f + j] as f64;
                        if fj != 0.0 && (j > i || (diag && j == i)) {
                            let w = j as f64 + 1.0;
                            gd[t * f + i] += w * fj;
                            gd[t * f + j] += w * fi;
                        }
                    }
                }
                for (q, &p) in csc.orig.iter().enumerate() {
                    let r = codes.offsets.partition_point(|&o| o <= p as usize) - 1;
                    let want = gd[r * f + codes.idx[p as usize] as usize];
                    assert!((g[q] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()));
                }
                s.reset();
                assert!(s.acc.iter().all(|&c| c == (0, 0.0)));
            }
        }
    }

    #[test]
    fn ema_bound_drops_smallest_pairs() {
        let mut ema = PairEma::new(4, 0.5, 0.0, 3);
        let t = ema.begin();
        let mut sv = vec![[0f32; 2]; 4];
        // Pairs (0,1)=0.9, (0,2)=0.1, (1,3)=0.5, (2,3)=0.3: 4 entries > 3 -> keep 2.
        let vals = |a: u32, b: u32| -> f32 {
            match (a, b) {
                (0, 1) => 0.9,
                (0, 2) => 0.1,
                (1, 3) => 0.5,
                (2, 3) => 0.3,
                _ => unreachable!(),
            }
        };
        let nbrs: [&[u32]; 4] = [&[1, 2], &[3], &[3], &[]];
        let (m, e) = (ema.momentum, ema.epsilon);
        for (i, list) in ema.lists.iter_mut().enumerate() {
            PairEma::update_list(m, e, t, list, nbrs[i], &mut sv, |j| {
                [vals(i as u32, j), 0.0]
            });
        }
        assert_eq!(ema.entries(), 4);
        ema.enforce_bound();
        let kept: Vec<(usize, u32)> = ema
            .lists
            .iter()
            .enumerate()
            .flat_map(|(i, l)| l.iter().map(move |e| (i, e.j)))
            .collect();
        assert_eq!(kept, vec![(0, 1), (1, 3)]);
        assert_eq!(ema.evicted, 2);
        // Lazy decay: one update later, (0,1) reads 0.9 * 0.5.
        ema.begin();
        assert!((ema.read(ema.lists[0].get(1).unwrap())[0] - 0.45).abs() < 1e-7);
        let bytes = ema.to_bytes();
        let mut back = PairEma::new(4, 0.5, 0.0, 3);
        back.load_bytes(&bytes).unwrap();
        assert_eq!(
            (back.lists.clone(), back.t, back.evicted),
            (ema.lists.clone(), ema.t, ema.evicted)
        );
        assert!(back.load_bytes(&bytes[..bytes.len() - 3]).is_err());
        assert!(PairEma::new(5, 0.5, 0.0, 3).load_bytes(&bytes).is_err());
    }
}
