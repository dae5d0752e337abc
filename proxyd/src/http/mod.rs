//! A lean HTTP proxy on httparse, h2 and tokio, with full control over every byte it sends:
//! HTTP/1.x (`conn`) and HTTP/2 (`h2`) clients, HTTP/1.1 to the servers (`exchange`), and
//! the tunnels of switched connections (`tunnel`).

pub mod body;
pub mod conn;
pub mod exchange;
pub mod fields;
pub mod h2;
pub mod head;
pub mod log;
pub mod redirect;
pub mod tunnel;
