//! proxyd (stub until its issue lands).
