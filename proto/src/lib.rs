//! Generated protobuf and gRPC code for every package of the project.
// Generated code is not ours to lint.
#![allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]

/// Encoded `FileDescriptorSet` of every .proto here, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

/// The fd lending protocol between fdkeeper and its borrowers.
pub mod fdlend {
    pub mod v1 {
        tonic::include_proto!("fdlend.v1");
    }
}

/// fdkeeper's admin gRPC API.
pub mod fdkeeper {
    pub mod v1 {
        tonic::include_proto!("fdkeeper.v1");
    }
}

/// proxyd's admin gRPC API and its master/worker control messages.
pub mod proxyd {
    pub mod v1 {
        tonic::include_proto!("proxyd.v1");
    }
    pub mod control {
        pub mod v1 {
            tonic::include_proto!("proxyd.control.v1");
        }
    }
}

/// stickd's local API (proxyd, operators) and its peer replication protocol.
pub mod stick {
    pub mod v1 {
        tonic::include_proto!("stick.v1");
    }
}
