// File writes that the CPU merge kernels run on one of their OpenMP threads.
//
// A streaming merge alternates between merging a tensor (all cores) and writing the previous
// result to its shard (one core: the page-cache copy of a buffered write). On a machine where
// every core merges, a writer thread only competes with the merge threads, and the merge's
// threads sleep or spin while the write runs alone. Instead the merge engine queues each write
// here; the next dynamically scheduled parallel loop of a CPU merge kernel (its bracket, L1 or
// merge pass) hands the queued writes to whichever of its threads reaches them first, and the
// other threads take that thread's share of the loop. Writes run one at a time, in the order
// they were queued.
//
// The same queue carries read-ahead advice (posix_fadvise WILLNEED on the next tensors' input
// bytes): the call queues the reads in the kernel and returns, but allocating and submitting
// them costs about 1.4 ms per 13 MB on this project's machine. Run on a merge thread, that work
// overlaps the other threads' merging; on a thread of its own it would compete with them.
#pragma once

#include <cstdint>
#include <string>

namespace meldkit {

// Queues a pwrite of `nbytes` bytes at `data` to `fd` at `offset`; returns its ticket (1, 2, ...).
// The memory and the descriptor must stay valid until the ticket is done.
int64_t side_write_queue(int fd, int64_t offset, const void* data, int64_t nbytes);

// Queues posix_fadvise(fd, offset, nbytes, POSIX_FADV_WILLNEED); returns its ticket. Advice
// only: a failure is ignored. The descriptor must stay valid until the ticket is done.
int64_t side_advise_queue(int fd, int64_t offset, int64_t nbytes);

// Whether a write is queued (a relaxed atomic load: cheap enough for every parallel loop).
bool side_writes_pending();

// Runs the queued writes on the calling thread unless another thread is running them; called
// by one thread at the start of a kernel's dynamically scheduled loop. Never throws: a failed
// write's error is kept for side_write_wait.
void side_writes_run_pending();

// The highest ticket whose write is done (writes finish in ticket order).
int64_t side_writes_done();

// Waits until `ticket` is done, running queued writes on the calling thread; throws a runtime
// error naming the first failed write, once (then forgets it).
void side_write_wait(int64_t ticket);

// Waits until `ticket` is done, as side_write_wait, but leaves a failed write's error for
// side_write_wait to report (for the owner of advice descriptors, before it closes them).
void side_jobs_wait(int64_t ticket);

}  // namespace meldkit
