//! Compiles the subset of etcd's `rpc.proto` the etcd baseline needs, with `protox` (pure Rust,
//! no `protoc`), the same way `proto/build.rs` compiles Dormant's own protos.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "proto/etcdserverpb/rpc.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["proto"])?;
    // Only the client is needed: the server is the real etcd.
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
