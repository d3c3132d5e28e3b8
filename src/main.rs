/// See the `mimalloc` line in Cargo.toml: measured in docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    audiolib::cli::main()
}
