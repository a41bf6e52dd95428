//! Compiles protos/*.proto into Rust with ttrpc-codegen's pure-Rust parser,
//! so building needs no protoc.
use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let protos = ["protos/agent.proto", "protos/health.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Codegen::new()
        .out_dir(&out_dir)
        .inputs(protos)
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            gen_mod: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(true))
        .run()
        .expect("ttrpc-codegen failed");
    // ttrpc-codegen 0.7 starts mod.rs with an inner attribute, which is not
    // allowed in a file brought in with include!(); the generated modules
    // carry their own copy of it.
    let mod_rs = std::path::Path::new(&out_dir).join("mod.rs");
    let text = std::fs::read_to_string(&mod_rs).expect("reading the generated mod.rs");
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| !line.starts_with("#!["))
        .collect();
    std::fs::write(&mod_rs, kept.join("\n") + "\n").expect("rewriting the generated mod.rs");
}
