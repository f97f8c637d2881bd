fn main() {
    eprintln!("podflare-hostd: not wired yet");
    std::process::exit(1);
}
