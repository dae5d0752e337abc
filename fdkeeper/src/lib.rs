//! fdkeeper (stub until its issue lands).
