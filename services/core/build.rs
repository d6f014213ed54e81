fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc unless the caller brings its own: no system package needed to build.
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    println!("cargo:rerun-if-changed=../../proto");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        // Inline bodies decode as slices of the received message, not copies.
        .bytes(".herald.v1.BodyRef")
        .compile_protos(&["../../proto/herald/v1/queue.proto"], &["../../proto"])?;
    Ok(())
}
