//! bf16 products on Intel AMX tiles: `C (+)= bf16(A) * B`, with B (a weight matrix) packed
//! once into the tile layout and every sum kept in f32 (`tdpbf16ps`).
//!
//! Why: on CPUs with AMX-BF16 (Sapphire Rapids and later) one tile instruction performs
//! 16 x 16 x 32 multiply-adds; the f32 AVX-512 kernels peak at 32 per cycle per core.
//! This is the arithmetic PyTorch uses for bf16 on such CPUs, so an LM forward in this
//! mode is the CPU counterpart of running the model in bf16 on a GPU.
//!
//! The numbers: A is rounded to bf16 (nearest even) as it is copied into tile order
//! (whole 1 KiB tiles of 16 rows x 32 k, zero-padded); B was rounded when packed; products of two bf16 are exact in f32 and
//! are summed in f32. Where the CPU has no AMX (or the OS refuses the tile state),
//! [`gemm_bf16_products`] computes the same rounded products with the f32 GEMM, so the mode
//! gives the same values (up to f32 summation order) on every machine and its tests run
//! everywhere.
//!
//! Layout of [`PackedBf16`]: column blocks of 16, each split into chunks of 32 rows of B;
//! a chunk is one 1 KiB tile, 16 rows of (16 columns x 2 consecutive k), the pair
//! interleaving `tdpbf16ps` expects. The micro-kernel holds a 32 x 32 block of C in four
//! tiles and walks k in chunks of 32: two A tiles (rows), two B tiles (columns), four
//! tile products.

use super::{gemm, MatMut, MatRef, SERIAL_BELOW};
use half::bf16;
use rayon::prelude::*;

/// bf16 values per tile row (64 bytes), i.e. the k of one tile product.
const CHUNK_K: usize = 32;
/// Columns of one C tile (16 f32 = 64 bytes).
const BLOCK_N: usize = 16;
/// Rows of C one micro-kernel call covers (two tiles of 16).
const PANEL_M: usize = 32;
/// u16 elements of one packed B tile.
const TILE_ELEMS: usize = 16 * CHUNK_K;

/// `x` rounded to the nearest bf16 (ties to even; NaN stays a quiet NaN), as the bit
/// pattern: `half::bf16::from_f32` without branches, so that a row converts in vector
/// registers.
#[inline]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let quiet_nan = (b >> 16) | 0x40;
    (if x.is_nan() { quiet_nan } else { rounded }) as u16
}

/// Where B's element (kk, jj) sits inside its column block of [`PackedBf16`]: tile (chunk)
/// `kk / 32`, tile row `(kk % 32) / 2`, the pair `(kk, kk + 1)` of column `jj` side by side.
#[inline]
fn in_block(kk: usize, jj: usize) -> usize {
    (kk / CHUNK_K) * TILE_ELEMS + ((kk % CHUNK_K) / 2) * CHUNK_K + jj * 2 + kk % 2
}

/// B (`k x n`) rounded to bf16 and packed into AMX tiles (see the module notes).
pub struct PackedBf16 {
    k: usize,
    n: usize,
    chunks: usize,
    blocks: usize,
    data: Vec<u16>,
}

impl PackedBf16 {
    /// Round `b` to bf16 (nearest even) and pack it. For a PyTorch-layout weight `W
    /// [out, in]` used as `y = x W^T`, pass `MatRef::row_major(w, out, in).t()`.
    pub fn pack(b: MatRef) -> PackedBf16 {
        b.check();
        let (k, n) = (b.rows, b.cols);
        let chunks = k.div_ceil(CHUNK_K);
        let blocks = n.div_ceil(BLOCK_N);
        let mut data = vec![0u16; blocks * chunks * TILE_ELEMS];
        data.par_chunks_mut((chunks * TILE_ELEMS).max(1))
            .enumerate()
            .for_each(|(jb, block)| {
                let width = BLOCK_N.min(n - jb * BLOCK_N);
                if b.rs == 1 {
                    // B = W^T of a row-major W: column j is W's row j, contiguous. Chunk
                    // by chunk, so the index stays inside one 1 KiB tile (indexing the
                    // whole block timed slower; this packing runs every bf16 TopK step).
                    for jj in 0..width {
                        let col = &b.data[((jb * BLOCK_N + jj) as isize * b.cs) as usize..][..k];
                        for (c, piece) in col.chunks(CHUNK_K).enumerate() {
                            let tile = &mut block[c * TILE_ELEMS..][..TILE_ELEMS];
                            for (kk, &x) in piece.iter().enumerate() {
                                tile[in_block(kk, jj)] = bf16_bits(x);
                            }
                        }
                    }
                } else if b.cs == 1 {
                    // Row-major B: row kk's columns of this block are contiguous.
                    for kk in 0..k {
                        let row = &b.data[(kk as isize * b.rs) as usize + jb * BLOCK_N..][..width];
                        for (jj, &x) in row.iter().enumerate() {
                            block[in_block(kk, jj)] = bf16_bits(x);
                        }
                    }
                } else {
                    for jj in 0..width {
                        for kk in 0..k {
                            block[in_block(kk, jj)] = bf16_bits(b.at(kk, jb * BLOCK_N + jj));
                        }
                    }
                }
            });
        PackedBf16 {
            k,
            n,
            chunks,
            blocks,
            data,
        }
    }

    pub fn rows(&self) -> usize {
        self.k
    }

    pub fn cols(&self) -> usize {
        self.n
    }

    /// Bytes of storage (padding included).
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// Element (kk, j) of the packed (rounded) matrix, as f32.
    pub fn at(&self, kk: usize, j: usize) -> f32 {
        let (jb, jj) = (j / BLOCK_N, j % BLOCK_N);
        let idx = jb * self.chunks * TILE_ELEMS + in_block(kk, jj);
        bf16::from_bits(self.data[idx]).to_f32()
    }

    /// The packed matrix widened back to a row-major f32 `k x n` (the fallback's B).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.k * self.n];
        out.par_chunks_mut(self.n.max(1))
            .enumerate()
            .for_each(|(kk, row)| {
                for (j, o) in row.iter_mut().enumerate() {
                    *o = self.at(kk, j);
                }
            });
        out
    }
}

/// `C = bf16(A) * B` (`accumulate == false`) or `C += bf16(A) * B`, sums in f32: on AMX
/// tiles where [`available`], otherwise with the f32 GEMM on the same rounded values.
pub fn gemm_bf16_products(a: MatRef, b: &PackedBf16, accumulate: bool, c: MatMut) {
    assert_eq!(a.cols, b.k, "gemm_bf16_products: inner dimensions differ");
    assert_eq!(a.rows, c.rows, "gemm_bf16_products: A rows != C rows");
    assert_eq!(b.n, c.cols, "gemm_bf16_products: B cols != C cols");
    a.check();
    c.check();
    if a.rows == 0 || b.n == 0 {
        return;
    }
    let injective = super::c_is_injective(&c);
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if injective && b.k > 0 && available() {
        tiles::gemm(a, b, accumulate, c);
        return;
    }
    let _ = injective;
    gemm_rounded_f32(a, b, accumulate, c);
}

/// [`super::gemm_tiles`] on bf16 products: `bf16(A) * B` (sums in f32) handed to `tile`
/// block by block while in cache, one task (state) per contiguous column range, in
/// column order. On AMX tiles where [`available`], otherwise `gemm_tiles` on the rounded
/// values. A TopK encoder selects from these and recomputes the chosen values in f32.
pub fn gemm_tiles_bf16<S: Send>(
    a: MatRef,
    b: &PackedBf16,
    init: &(dyn Fn(std::ops::Range<usize>, std::ops::Range<usize>) -> S + Sync),
    tile: &(dyn Fn(&mut S, &super::Tile) + Sync),
) -> Vec<S> {
    assert_eq!(a.cols, b.k, "gemm_tiles_bf16: inner dimensions differ");
    a.check();
    if a.rows == 0 || b.n == 0 {
        return Vec::new();
    }
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if available() && b.k > 0 {
        return tiles::gemm_tiles(a, b, init, tile);
    }
    let ar = round_f32(a);
    let bf = b.to_f32();
    super::gemm_tiles(
        MatRef::row_major(&ar, a.rows, a.cols),
        MatRef::row_major(&bf, b.k, b.n),
        init,
        tile,
    )
}

/// `a` rounded to bf16 values, as a row-major f32 matrix.
fn round_f32(a: MatRef) -> Vec<f32> {
    let (m, k) = (a.rows, a.cols);
    let mut ar = vec![0f32; m * k];
    for (i, row) in ar.chunks_mut(k.max(1)).enumerate() {
        for (kk, o) in row.iter_mut().enumerate() {
            *o = bf16::from_bits(bf16_bits(a.at(i, kk))).to_f32();
        }
    }
    ar
}

/// The fallback (and the tests' reference): round A, widen B, multiply in f32.
pub fn gemm_rounded_f32(a: MatRef, b: &PackedBf16, accumulate: bool, c: MatMut) {
    let (m, k) = (a.rows, a.cols);
    let ar = round_f32(a);
    let bf = b.to_f32();
    gemm(
        1.0,
        MatRef::row_major(&ar, m, k),
        MatRef::row_major(&bf, k, b.n),
        if accumulate { 1.0 } else { 0.0 },
        c,
    );
}

/// True when this CPU has AMX-BF16 and the OS granted this process the tile state.
/// Checked once; `SAELAB_NO_AMX=1` forces the f32 fallback (for comparisons).
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if std::env::var_os("SAELAB_NO_AMX").is_some_and(|v| v == "1") {
            return false;
        }
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            tiles::request_permission()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod tiles {
    use super::*;
    use crate::gemm::{SyncPtr, Tile};
    use std::arch::asm;

    /// CPUID leaf 7 EDX: AMX-BF16 is bit 22, AMX-TILE bit 24. Linux hands out the tile
    /// data state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`);
    /// without it the first tile instruction raises SIGILL.
    pub(super) fn request_permission() -> bool {
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let has_amx = leaf7.edx & (1 << 22) != 0 && leaf7.edx & (1 << 24) != 0;
        if !has_amx {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain syscall with integer arguments; failure is a return code.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        rc == 0
    }

    /// Palette 1, all eight tiles 16 rows x 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    static CONFIG: TileConfig = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
            t += 1;
        }
        TileConfig(c)
    };

    /// bf16(A) in tiles: for each 32-row panel and k chunk, two contiguous 1 KiB tiles
    /// (rows 0-15, 16-31); rows past m and k past the end are zeros. Returns the padded
    /// row count.
    fn pack_a(a: MatRef, chunks: usize) -> (Vec<u16>, usize) {
        let (m, k) = (a.rows, a.cols);
        let m_pad = m.div_ceil(PANEL_M) * PANEL_M;
        let panel_elems = chunks * 2 * TILE_ELEMS;
        let mut a16 = vec![0u16; m_pad * chunks * CHUNK_K];
        a16.par_chunks_mut(panel_elems)
            .enumerate()
            .for_each(|(p, panel)| {
                let rows = PANEL_M.min(m - p * PANEL_M);
                if a.rs == 1 && a.cs != 1 {
                    // A = X^T of a row-major X (e.g. codes^T in a weight gradient): the
                    // panel's 32 rows are 32 neighbours in each of X's rows.
                    for kk in 0..k {
                        let src = &a.data[(kk as isize * a.cs) as usize + p * PANEL_M..][..rows];
                        let base = (kk / CHUNK_K) * 2 * TILE_ELEMS + kk % CHUNK_K;
                        for (r, &x) in src.iter().enumerate() {
                            panel[base + (r / 16) * TILE_ELEMS + (r % 16) * CHUNK_K] = bf16_bits(x);
                        }
                    }
                    return;
                }
                // Strided rows are gathered here first (contiguous ones are read in place).
                let mut row = if a.cs == 1 { Vec::new() } else { vec![0f32; k] };
                for r in 0..rows {
                    let i = p * PANEL_M + r;
                    let src: &[f32] = if a.cs == 1 {
                        &a.data[(i as isize * a.rs) as usize..][..k]
                    } else {
                        for (kk, x) in row[..k].iter_mut().enumerate() {
                            *x = a.at(i, kk);
                        }
                        &row[..k]
                    };
                    let tile_row = (r / 16) * TILE_ELEMS + (r % 16) * CHUNK_K;
                    for (c, piece) in src.chunks(CHUNK_K).enumerate() {
                        let dst = &mut panel[c * 2 * TILE_ELEMS + tile_row..][..piece.len()];
                        for (d, &x) in dst.iter_mut().zip(piece) {
                            *d = bf16_bits(x);
                        }
                    }
                }
            });
        (a16, m_pad)
    }

    /// Threads for the product, and each one's contiguous range of column-block pairs.
    fn split(m: usize, b: &PackedBf16) -> Vec<std::ops::Range<usize>> {
        let pairs = b.blocks.div_ceil(2);
        let threads = if m.saturating_mul(b.n).saturating_mul(b.k) < SERIAL_BELOW {
            1
        } else {
            rayon::current_num_threads().min(pairs).max(1)
        };
        (0..threads)
            .map(|t| pairs * t / threads..pairs * (t + 1) / threads)
            .collect()
    }

    pub(super) fn gemm(a: MatRef, b: &PackedBf16, accumulate: bool, c: MatMut) {
        let (a16, m_pad) = pack_a(a, b.chunks);
        let (c_rs, c_cs) = (c.rs, c.cs);
        let cptr = SyncPtr(c.data.as_mut_ptr());
        let a16 = &a16;
        split(a.rows, b).into_par_iter().for_each(|range| {
            let mut sink = Sink::C(Out {
                ptr: cptr,
                rs: c_rs,
                cs: c_cs,
                m: a.rows,
                n: b.n,
                accumulate,
            });
            // SAFETY: every tile load reads inside `a16` (m_pad / 32 whole panels) or inside
            // `b.data` (blocks x chunks tiles; a missing odd block re-reads the last one and
            // its columns, all >= n, are never written); each thread writes only the
            // columns of its own block pairs of C, which is injective and exclusively
            // borrowed by the caller.
            unsafe { strip(a16, m_pad, b, range, &mut sink) };
        });
    }

    pub(super) fn gemm_tiles<S: Send>(
        a: MatRef,
        b: &PackedBf16,
        init: &(dyn Fn(std::ops::Range<usize>, std::ops::Range<usize>) -> S + Sync),
        tile: &(dyn Fn(&mut S, &Tile) + Sync),
    ) -> Vec<S> {
        let (a16, m_pad) = pack_a(a, b.chunks);
        let a16 = &a16;
        let (m, n) = (a.rows, b.n);
        split(m, b)
            .into_par_iter()
            .map(|range| {
                let cols = (range.start * 2 * BLOCK_N).min(n)..(range.end * 2 * BLOCK_N).min(n);
                let mut state = init(0..m, cols);
                let mut feed = |t: &Tile| tile(&mut state, t);
                // SAFETY: reads as in `gemm`; the tiles are this thread's buffer.
                unsafe { strip(a16, m_pad, b, range, &mut Sink::Tiles { m, f: &mut feed }) };
                state
            })
            .collect()
    }

    /// Where finished 32 x 32 blocks go.
    enum Sink<'a> {
        /// Into C (straight from the tiles where a whole block fits a row-major C).
        C(Out),
        /// To a consumer, as [`Tile`]s of the valid rows (of `m`) and columns.
        Tiles {
            m: usize,
            f: &'a mut dyn FnMut(&Tile),
        },
    }

    /// Where and how a panel of C is written.
    struct Out {
        ptr: SyncPtr,
        rs: isize,
        cs: isize,
        m: usize,
        n: usize,
        accumulate: bool,
    }

    /// Column-block pairs whose blocks a [`Sink::Tiles`] consumer gets as one tile
    /// (256 columns): a top-k consumer's per-call cost is paid per 256 values, not per 32.
    const GROUP: usize = 8;

    /// All of C's rows for column-block pairs `pairs`.
    unsafe fn strip(
        a16: &[u16],
        m_pad: usize,
        b: &PackedBf16,
        pairs: std::ops::Range<usize>,
        sink: &mut Sink,
    ) {
        asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
        let mut tmp = [0f32; PANEL_M * 2 * BLOCK_N];
        // Rows in blocks whose bf16 A (~256 KiB) stays in L2 next to the column pairs' B
        // streaming through it; each pair's B (chunks x 2 KiB) is reused by every 32-row
        // panel of the block. 256 KiB measured 10-20% faster than 1 MiB on the SAE encoder
        // shapes (`cargo bench -p saelab-core --bench gemm`, two alternations each).
        let block_m = ((256 << 10) / (b.chunks * 2 * TILE_ELEMS * 2)).max(1) * PANEL_M;
        match sink {
            Sink::C(out) => {
                for rb in (0..m_pad).step_by(block_m) {
                    for pair in pairs.clone() {
                        panels(a16, rb..(rb + block_m).min(m_pad), b, pair, out, &mut tmp);
                    }
                }
            }
            Sink::Tiles { m, f } => {
                // Blocks go straight from the tiles into a row block x GROUP pairs buffer
                // (every block is whole there), handed over panel by panel.
                let width = GROUP * 2 * BLOCK_N;
                let mut buf = vec![0f32; block_m * width];
                for rb in (0..m_pad).step_by(block_m) {
                    let rows = rb..(rb + block_m).min(m_pad);
                    let mut g0 = pairs.start;
                    while g0 < pairs.end {
                        let g1 = (g0 + GROUP).min(pairs.end);
                        let col0 = g0 * 2 * BLOCK_N;
                        // Absolute (row, column) -> buf[(row - rb) * width + column - col0].
                        let into = Out {
                            ptr: SyncPtr(buf.as_mut_ptr().wrapping_sub(rb * width + col0)),
                            rs: width as isize,
                            cs: 1,
                            m: rows.end,
                            n: g1 * 2 * BLOCK_N,
                            accumulate: false,
                        };
                        for pair in g0..g1 {
                            panels(a16, rows.clone(), b, pair, &into, &mut tmp);
                        }
                        let cols = (g1 * 2 * BLOCK_N).min(b.n) - col0;
                        for row0 in rows.clone().step_by(PANEL_M).take_while(|&r| r < *m) {
                            f(&Tile {
                                row0,
                                col0,
                                rows: PANEL_M.min(*m - row0),
                                cols,
                                stride: width,
                                data: &buf[(row0 - rb) * width..],
                            });
                        }
                        g0 = g1;
                    }
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }

    /// The 32-row panels `rows` of C's column-block pair `pair` (tiles configured).
    unsafe fn panels(
        a16: &[u16],
        rows: std::ops::Range<usize>,
        b: &PackedBf16,
        pair: usize,
        out: &Out,
        tmp: &mut [f32; PANEL_M * 2 * BLOCK_N],
    ) {
        let tile_bytes = TILE_ELEMS * 2;
        let jb0 = 2 * pair;
        let jb1 = (jb0 + 1).min(b.blocks - 1);
        let b0 = b.data.as_ptr().add(jb0 * b.chunks * TILE_ELEMS) as *const u8;
        let b1 = b.data.as_ptr().add(jb1 * b.chunks * TILE_ELEMS) as *const u8;
        let col0 = jb0 * BLOCK_N;
        let c_stride = out.rs as usize * 4;
        for row0 in rows.step_by(PANEL_M) {
            let a0 = a16.as_ptr().add(row0 * b.chunks * CHUNK_K) as *const u8;
            let a1 = a0.add(tile_bytes);
            // Whole 32 x 32 block inside a row-major C: tiles go straight to C.
            let direct = out.cs == 1 && row0 + PANEL_M <= out.m && col0 + 2 * BLOCK_N <= out.n;
            // `wrapping_offset`: a grouped sink's base pointer lies before its buffer.
            let cblk = out
                .ptr
                .get()
                .wrapping_offset(row0 as isize * out.rs + col0 as isize)
                as *mut u8;
            if direct && out.accumulate {
                asm!(
                    "tileloadd tmm0, [{c} + {s}*1]",
                    "tileloadd tmm1, [{c} + {s}*1 + 64]",
                    "tileloadd tmm2, [{c2} + {s}*1]",
                    "tileloadd tmm3, [{c2} + {s}*1 + 64]",
                    c = in(reg) cblk, c2 = in(reg) cblk.wrapping_add(16 * c_stride), s = in(reg) c_stride,
                    options(nostack, readonly)
                );
            } else {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
            }
            for ch in 0..b.chunks {
                asm!(
                    "tileloadd tmm4, [{a0} + {s}*1]",
                    "tileloadd tmm6, [{b0} + {s}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b1} + {s}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {s}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0.add(ch * 2 * tile_bytes),
                    a1 = in(reg) a1.add(ch * 2 * tile_bytes),
                    b0 = in(reg) b0.add(ch * tile_bytes),
                    b1 = in(reg) b1.add(ch * tile_bytes),
                    s = in(reg) CHUNK_K * 2,
                    options(nostack, readonly)
                );
            }
            if direct {
                asm!(
                    "tilestored [{c} + {s}*1], tmm0",
                    "tilestored [{c} + {s}*1 + 64], tmm1",
                    "tilestored [{c2} + {s}*1], tmm2",
                    "tilestored [{c2} + {s}*1 + 64], tmm3",
                    c = in(reg) cblk, c2 = in(reg) cblk.wrapping_add(16 * c_stride), s = in(reg) c_stride,
                    options(nostack)
                );
                continue;
            }
            // Edge or strided C: through the 32 x 32 buffer, valid elements only.
            let t = tmp.as_mut_ptr() as *mut u8;
            let ts = 2 * BLOCK_N * 4;
            asm!(
                "tilestored [{c} + {s}*1], tmm0",
                "tilestored [{c} + {s}*1 + 64], tmm1",
                "tilestored [{c2} + {s}*1], tmm2",
                "tilestored [{c2} + {s}*1 + 64], tmm3",
                c = in(reg) t, c2 = in(reg) t.add(16 * ts), s = in(reg) ts,
                options(nostack)
            );
            let rows = PANEL_M.min(out.m.saturating_sub(row0));
            let cols = (2 * BLOCK_N).min(out.n.saturating_sub(col0));
            for i in 0..rows {
                for j in 0..cols {
                    let dst = out.ptr.get().wrapping_offset(
                        (row0 + i) as isize * out.rs + (col0 + j) as isize * out.cs,
                    );
                    let v = tmp[i * 2 * BLOCK_N + j];
                    *dst = if out.accumulate { *dst + v } else { v };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// f64 sums of the bf16-rounded products: what both paths must compute.
    fn reference(a: &[f32], m: usize, k: usize, b: &PackedBf16, c0: &[f32], acc: bool) -> Vec<f64> {
        let n = b.cols();
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = if acc { c0[i * n + j] as f64 } else { 0.0 };
                for kk in 0..k {
                    s += bf16::from_f32(a[i * k + kk]).to_f32() as f64 * b.at(kk, j) as f64;
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    fn check(m: usize, k: usize, n: usize, acc: bool, f: fn(MatRef, &PackedBf16, bool, MatMut)) {
        let mut r = Rng::new((m * 131 + k * 17 + n) as u64);
        let mut a = vec![0f32; m * k];
        let mut w = vec![0f32; n * k];
        let mut c = vec![0f32; m * n];
        r.fill_normal(&mut a, 1.0);
        r.fill_normal(&mut w, 1.0);
        r.fill_normal(&mut c, 1.0);
        let c0 = c.clone();
        // B = W^T, as the LM's linear layers use it.
        let b = PackedBf16::pack(MatRef::row_major(&w, n, k).t());
        for (j, row) in w.chunks(k.max(1)).enumerate() {
            for (kk, &x) in row.iter().enumerate() {
                assert_eq!(
                    b.at(kk, j),
                    bf16::from_f32(x).to_f32(),
                    "packed ({kk}, {j})"
                );
            }
        }
        let want = reference(&a, m, k, &b, &c, acc);
        f(
            MatRef::row_major(&a, m, k),
            &b,
            acc,
            MatMut::row_major(&mut c, m, n),
        );
        check_close(&c, &want, m, k, n, acc);
        // The other layouts: A stored transposed (a weight gradient's codes^T), B
        // row-major; same values, same reference.
        let mut at = vec![0f32; k * m];
        for i in 0..m {
            for kk in 0..k {
                at[kk * m + i] = a[i * k + kk];
            }
        }
        let mut wt = vec![0f32; k * n];
        for j in 0..n {
            for kk in 0..k {
                wt[kk * n + j] = w[j * k + kk];
            }
        }
        let b_rm = PackedBf16::pack(MatRef::row_major(&wt, k, n));
        assert!((0..k).all(|kk| (0..n).all(|j| b_rm.at(kk, j) == b.at(kk, j))));
        let mut c2 = c0.clone();
        f(
            MatRef::row_major(&at, k, m).t(),
            &b_rm,
            acc,
            MatMut::row_major(&mut c2, m, n),
        );
        check_close(&c2, &want, m, k, n, acc);
    }

    fn check_close(c: &[f32], want: &[f64], m: usize, k: usize, n: usize, acc: bool) {
        for (idx, (&got, &want)) in c.iter().zip(want).enumerate() {
            // f32 sums of k terms of size ~1 (products are exact): error ~ k * 2^-24 * |sum|.
            let tol = 1e-5 * (k as f64).sqrt() * (1.0 + want.abs());
            assert!(
                (got as f64 - want).abs() <= tol,
                "{m}x{k}x{n} acc={acc}: element {idx}: {got} vs {want}"
            );
        }
    }

    const SHAPES: [(usize, usize, usize); 7] = [
        (1, 1, 1),
        (3, 0, 4),
        (5, 7, 3),
        (32, 64, 32),
        (33, 70, 49),
        (96, 576, 200),
        (130, 100, 576),
    ];

    #[test]
    fn bf16_bits_rounds_like_half() {
        let mut r = Rng::new(3);
        let mut xs = vec![0f32; 4096];
        r.fill_normal(&mut xs, 1e3);
        xs.extend([
            0.0,
            -0.0,
            1.0 + f32::EPSILON,
            f32::MAX,
            f32::MIN_POSITIVE / 3.0,
        ]);
        xs.extend([
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(0x3f80_8000),
        ]);
        for &x in &xs {
            assert_eq!(bf16_bits(x), bf16::from_f32(x).to_bits(), "{x:e}");
        }
        let nan = bf16::from_bits(bf16_bits(f32::NAN));
        assert!(nan.is_nan());
    }

    #[test]
    fn rounded_f32_fallback_matches_f64_reference() {
        for &(m, k, n) in &SHAPES {
            for acc in [false, true] {
                check(m, k, n, acc, gemm_rounded_f32);
            }
        }
    }

    /// On a CPU with AMX this runs the tile kernel (interior blocks written straight to C,
    /// edges through the buffer, both threads); elsewhere the dispatcher's fallback.
    #[test]
    fn bf16_products_match_f64_reference() {
        eprintln!("AMX available: {}", available());
        for &(m, k, n) in &SHAPES {
            for acc in [false, true] {
                check(m, k, n, acc, gemm_bf16_products);
            }
        }
    }

    #[test]
    fn tiles_cover_the_product_once() {
        for &(m, k, n) in &[(1, 3, 5), (33, 70, 49), (200, 96, 300), (70, 64, 1100)] {
            let mut r = Rng::new((m + k + n) as u64);
            let mut a = vec![0f32; m * k];
            let mut w = vec![0f32; n * k];
            r.fill_normal(&mut a, 1.0);
            r.fill_normal(&mut w, 1.0);
            let b = PackedBf16::pack(MatRef::row_major(&w, n, k).t());
            let want = reference(&a, m, k, &b, &[], false);
            // Each task copies its tiles into its own full-size matrix; every element must
            // be written by exactly one tile of one task, inside that task's columns.
            let states = gemm_tiles_bf16(
                MatRef::row_major(&a, m, k),
                &b,
                &|rows, cols| (rows, cols, vec![f32::NAN; m * n]),
                &|s: &mut (_, std::ops::Range<usize>, Vec<f32>), t: &crate::gemm::Tile| {
                    for i in 0..t.rows {
                        for (j, &v) in t.row(i).iter().enumerate() {
                            let (r, c) = (t.row0 + i, t.col0 + j);
                            assert!(s.1.contains(&c) && s.2[r * n + c].is_nan());
                            s.2[r * n + c] = v;
                        }
                    }
                },
            );
            let mut got = vec![f32::NAN; m * n];
            for (_, _, part) in states {
                for (g, p) in got.iter_mut().zip(part) {
                    if !p.is_nan() {
                        assert!(g.is_nan(), "element written twice");
                        *g = p;
                    }
                }
            }
            for (idx, (&g, &w)) in got.iter().zip(&want).enumerate() {
                let tol = 1e-5 * (k as f64).sqrt() * (1.0 + w.abs());
                assert!(
                    (g as f64 - w).abs() <= tol,
                    "{m}x{k}x{n}: {idx}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn strided_output_is_written_element_by_element() {
        let (m, k, n) = (40, 64, 40);
        let mut r = Rng::new(7);
        let mut a = vec![0f32; m * k];
        let mut w = vec![0f32; k * n];
        r.fill_normal(&mut a, 1.0);
        r.fill_normal(&mut w, 1.0);
        let b = PackedBf16::pack(MatRef::row_major(&w, k, n));
        for (i, &x) in w.iter().enumerate() {
            assert_eq!(b.at(i / n, i % n), bf16::from_f32(x).to_f32());
        }
        let mut ct = vec![0f32; n * m];
        // C^T as a column-major view of an n x m buffer.
        let cv = MatMut {
            data: &mut ct,
            rows: m,
            cols: n,
            rs: 1,
            cs: m as isize,
        };
        gemm_bf16_products(MatRef::row_major(&a, m, k), &b, false, cv);
        let want = reference(&a, m, k, &b, &vec![0.0; m * n], false);
        for i in 0..m {
            for j in 0..n {
                let (got, w) = (ct[j * m + i] as f64, want[i * n + j]);
                assert!(
                    (got - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "({i},{j}): {got} vs {w}"
                );
            }
        }
    }
}
