fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc unless the caller brings its own: no system package needed to build.
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    println!("cargo:rerun-if-changed=../../proto");
    // Events are herald-core's own types (queue.proto): one Rust type per message, whether it
    // came from the stream or goes out in an answer.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .extern_path(".herald.v1.Event", "::herald_core::envelope::Event")
        .extern_path(".herald.v1.EventKind", "::herald_core::envelope::EventKind")
        .compile_protos(&["../../proto/herald/v1/api.proto"], &["../../proto"])?;
    Ok(())
}
