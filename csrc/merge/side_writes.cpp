// The queue of side_writes.h: a mutex-guarded FIFO, and a second mutex held by whichever thread
// runs the writes, so that they run one at a time and finish in ticket order.
#include "meldkit/side_writes.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <mutex>

#include "meldkit/status.h"

namespace meldkit {
namespace {

struct Job {
  int64_t ticket;
  bool advice;  // posix_fadvise WILLNEED instead of a write
  int fd;
  int64_t offset;
  const char* data;
  int64_t nbytes;
};

struct Queue {
  std::mutex lock;    // guards jobs, next, error
  std::mutex runner;  // held while writes run
  std::deque<Job> jobs;
  int64_t next = 1;
  std::atomic<int64_t> done{0};
  std::atomic<bool> pending{false};
  std::string error;
};

Queue& queue() {
  static Queue* q = new Queue();  // never destroyed: kernels may still look at it at exit
  return *q;
}

// pwrite until every byte is written; an errno message on failure.
std::string write_all(const Job& j) {
  int64_t done = 0;
  while (done < j.nbytes) {
    const ssize_t n =
        ::pwrite(j.fd, j.data + done, size_t(j.nbytes - done), off_t(j.offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return std::strerror(errno);
    }
    if (n == 0) return "no progress (pwrite wrote 0 bytes)";
    done += n;
  }
  return {};
}

// Runs queued writes until none is left; the caller holds q.runner.
void run_locked(Queue& q) {
  for (;;) {
    Job j;
    {
      std::lock_guard<std::mutex> g(q.lock);
      if (q.jobs.empty()) {
        q.pending.store(false, std::memory_order_relaxed);
        return;
      }
      j = q.jobs.front();
      q.jobs.pop_front();
    }
    if (j.advice) {
#ifdef POSIX_FADV_WILLNEED
      (void)::posix_fadvise(j.fd, off_t(j.offset), off_t(j.nbytes), POSIX_FADV_WILLNEED);
#endif
      q.done.store(j.ticket, std::memory_order_release);
      continue;
    }
    std::string err = write_all(j);
    if (!err.empty()) {
      std::lock_guard<std::mutex> g(q.lock);
      if (q.error.empty()) {
        q.error = "writing " + std::to_string(j.nbytes) + " bytes at offset " +
                  std::to_string(j.offset) + " failed: " + err;
      }
    }
    q.done.store(j.ticket, std::memory_order_release);
  }
}

}  // namespace

namespace {

int64_t enqueue(bool advice, int fd, int64_t offset, const void* data, int64_t nbytes) {
  Queue& q = queue();
  std::lock_guard<std::mutex> g(q.lock);
  const int64_t ticket = q.next++;
  q.jobs.push_back(Job{ticket, advice, fd, offset, static_cast<const char*>(data), nbytes});
  q.pending.store(true, std::memory_order_relaxed);
  return ticket;
}

// Runs queued jobs on the calling thread until `ticket` is done; `op` names the caller in the
// error for a ticket that was never queued.
void wait_queued(Queue& q, int64_t ticket, const char* op) {
  {
    std::lock_guard<std::mutex> g(q.lock);
    if (ticket >= q.next) {
      throw_value_error(std::string(op) + ": ticket " + std::to_string(ticket) +
                        " was never queued");
    }
  }
  if (q.done.load(std::memory_order_acquire) < ticket) {
    std::lock_guard<std::mutex> r(q.runner);  // waits for a running thread, then runs the rest
    run_locked(q);
  }
}

}  // namespace

int64_t side_write_queue(int fd, int64_t offset, const void* data, int64_t nbytes) {
  if (fd < 0 || offset < 0 || nbytes < 0 || (nbytes > 0 && data == nullptr)) {
    throw_value_error("side_write: bad descriptor, offset, size or data pointer");
  }
  return enqueue(false, fd, offset, data, nbytes);
}

int64_t side_advise_queue(int fd, int64_t offset, int64_t nbytes) {
  if (fd < 0 || offset < 0 || nbytes < 0) {
    throw_value_error("side_advise: bad descriptor, offset or size");
  }
  return enqueue(true, fd, offset, nullptr, nbytes);
}

bool side_writes_pending() { return queue().pending.load(std::memory_order_relaxed); }

void side_writes_run_pending() {
  Queue& q = queue();
  std::unique_lock<std::mutex> r(q.runner, std::try_to_lock);
  if (r.owns_lock()) run_locked(q);
}

int64_t side_writes_done() { return queue().done.load(std::memory_order_acquire); }

void side_write_wait(int64_t ticket) {
  Queue& q = queue();
  wait_queued(q, ticket, "side_write_wait");
  std::string err;
  {
    std::lock_guard<std::mutex> g(q.lock);
    err.swap(q.error);
  }
  if (!err.empty()) throw_runtime_error(err);
}

void side_jobs_wait(int64_t ticket) { wait_queued(queue(), ticket, "side_jobs_wait"); }

}  // namespace meldkit
