//! The disk service of `sys-usb`: the dictionary's commands (`service`), the disks and the local
//! repository (`disks`), the checks of a path a requester sent (`paths`, pure), every file
//! operation beneath a disk's directory handle (`fsops`), the announcements of new files and of
//! the disks that come and go (`announce`), and the memory of requests already answered
//! (`once`, pure: a redelivered request is answered alike, not run again), the uploads going
//! (`upload`, pure: a file in chunks, taken in order, named when whole).

pub mod announce;
pub mod disks;
pub mod fsops;
pub mod once;
pub mod paths;
pub mod service;
pub mod upload;
