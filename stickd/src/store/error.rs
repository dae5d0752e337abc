//! What the store's operations can fail with.

use common::stick_key::KeyError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unknown table '{0}'")]
    UnknownTable(String),
    /// A key that does not fit its table's type (see `common::stick_key`).
    #[error("table '{table}': {source}")]
    Key {
        table: String,
        #[source]
        source: KeyError,
    },
    #[error("table '{table}': key '{key}': {reason}")]
    BadServer {
        table: String,
        key: String,
        reason: &'static str,
    },
    #[error("empty request: {0}")]
    Empty(&'static str),
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt record in {what}: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("the change log no longer holds sequence {0}")]
    LogGap(u64),
}

impl StoreError {
    /// A key that does not fit its table's definition (a peer's such entries are skipped).
    pub fn is_bad_key(&self) -> bool {
        matches!(self, StoreError::Key { .. })
    }
}
