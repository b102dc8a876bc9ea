//! Pure policy shared by the controller and the custody service: how a grant
//! and an identity are judged, and which objects a change affects. No I/O.

pub mod evaluate;
pub mod store_index;
