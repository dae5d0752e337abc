//! A lean HTTP/1.1 proxy on httparse and tokio, with full control over every byte it sends.

pub mod body;
pub mod conn;
pub mod fields;
pub mod head;
pub mod redirect;
