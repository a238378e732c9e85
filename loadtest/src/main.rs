//! Load tester for the SFU (synthetic publishers and subscribers over the
//! public REST and WebSocket API). The scenario runner is not built yet;
//! this binary only reports that.

fn main() {
    eprintln!("loadtest: scenarios are not implemented yet; see the project's issue tracker");
    std::process::exit(2);
}
