//! stickd (stub until its issue lands).
