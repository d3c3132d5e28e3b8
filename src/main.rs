fn main() -> std::process::ExitCode {
    audiolib::cli::main()
}
