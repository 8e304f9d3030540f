//! Shared by the SAE benches: the widths to run and the bench shape.

/// Latents, top-k and batch rows of every SAE bench (the benchmark setting).
pub const SHAPE: (usize, usize, usize) = (16384, 40, 2048);

/// The d_in values given on the command line (default 576 and 2304); prints the threads.
pub fn dims() -> Vec<usize> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    println!("threads: {}", rayon::current_num_threads());
    if args.is_empty() {
        vec![576, 2304]
    } else {
        args
    }
}
