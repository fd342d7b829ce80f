// CPU execution of one CUDA launch for caffeish.kernels.harness.
//
// harness_launch(body, args, grid, block, barriers) runs every block of the
// grid in order.  Without barriers each thread of a block runs to completion in
// turn.  With barriers each CUDA thread is a fiber with its own stack: the
// scheduler resumes every unfinished fiber once per round, and a fiber gives
// control back at __syncthreads, so no thread passes a barrier before all the
// threads of its block have reached it.  A round in which some threads finish
// while others wait at a barrier is a divergent __syncthreads (undefined in
// CUDA) and is reported as an error.
//
// Fibers live for the whole process and run the current launch's body in a
// loop.  On x86-64 they switch with six pushes and pops (no system call); other
// machines use ucontext (swapcontext), which is correct but slower.
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "harness_shim.h"

#if !defined(__x86_64__) || defined(CAFFEISH_HARNESS_UCONTEXT)
#include <ucontext.h>
#endif

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace {

typedef void (*Body)(void**);

enum { READY = 0, AT_BARRIER = 1, DONE = 2 };
enum { OK = 0, DIVERGENT_BARRIER = 1, BARRIER_WITHOUT_FIBERS = 2, BAD_BLOCK = 3 };

const size_t kStackBytes = 64 * 1024;

bool fiber_mode = false;
int error = OK;
Body body = nullptr;
void** body_args = nullptr;
unsigned current = 0;

void set_thread(unsigned t) {
    threadIdx.x = t % blockDim.x;
    threadIdx.y = (t / blockDim.x) % blockDim.y;
    threadIdx.z = t / (blockDim.x * blockDim.y);
}

#if defined(__x86_64__) && !defined(CAFFEISH_HARNESS_UCONTEXT)
// caffeish_switch(save, load): push the callee-saved registers, store the stack
// pointer in *save, load `load` as the stack pointer, pop and return there.
extern "C" void caffeish_switch(void** save, void* load);
asm(".text\n"
    ".globl caffeish_switch\n"
    ".type caffeish_switch,@function\n"
    "caffeish_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size caffeish_switch, .-caffeish_switch\n");

struct Fiber {
    void* sp;
    char* stack;
    int state;
};
void* scheduler_sp = nullptr;
std::vector<Fiber> fibers;

void to_scheduler() { caffeish_switch(&fibers[current].sp, scheduler_sp); }
void resume(unsigned t) { caffeish_switch(&scheduler_sp, fibers[t].sp); }

[[noreturn]] void fiber_main() {
    for (;;) {
        body(body_args);
        fibers[current].state = DONE;
        to_scheduler();
    }
}

// A fresh stack whose first resume "returns" into fiber_main with the ABI's alignment.
void start_fiber(Fiber& f) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStackBytes) & ~uintptr_t(15);
    void** slot = reinterpret_cast<void**>(top - 16);
    slot[0] = reinterpret_cast<void*>(&fiber_main);
    slot[1] = nullptr;
    for (int i = 1; i <= 6; ++i) slot[-i] = nullptr;  // rbp rbx r12 r13 r14 r15
    f.sp = slot - 6;
    f.state = DONE;
}

void ensure_fibers(unsigned threads) {
    while (fibers.size() < threads) {
        Fiber f;
        f.stack = static_cast<char*>(std::malloc(kStackBytes));
        start_fiber(f);
        fibers.push_back(f);
    }
}

void reset_fibers() {
    for (Fiber& f : fibers) start_fiber(f);
}
#else
struct Fiber {
    ucontext_t context;
    char* stack;
    int state;
};
ucontext_t scheduler;
std::vector<Fiber> fibers;

void to_scheduler() { swapcontext(&fibers[current].context, &scheduler); }
void resume(unsigned t) { swapcontext(&scheduler, &fibers[t].context); }

void fiber_main() {
    for (;;) {
        body(body_args);
        fibers[current].state = DONE;
        to_scheduler();
    }
}

void start_fiber(Fiber& f) {
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
    f.state = DONE;
}

void ensure_fibers(unsigned threads) {
    if (fibers.size() >= threads) return;
    fibers.reserve(threads);  // contexts must not move once made
    while (fibers.size() < threads) {
        fibers.push_back(Fiber());
        fibers.back().stack = static_cast<char*>(std::malloc(kStackBytes));
    }
    for (Fiber& f : fibers) start_fiber(f);
}

void reset_fibers() {
    for (Fiber& f : fibers) start_fiber(f);
}
#endif

int run_block_fibers(unsigned threads) {
    for (unsigned t = 0; t < threads; ++t) fibers[t].state = READY;
    for (;;) {
        unsigned waiting = 0, finished = 0;
        for (unsigned t = 0; t < threads; ++t) {
            if (fibers[t].state == DONE) continue;
            fibers[t].state = READY;
            current = t;
            set_thread(t);
            resume(t);
            if (fibers[t].state == AT_BARRIER) ++waiting; else ++finished;
        }
        if (waiting == 0) return OK;
        if (finished != 0) {
            reset_fibers();  // the waiting fibers are abandoned mid-kernel
            return DIVERGENT_BARRIER;
        }
    }
}

}  // namespace

void __syncthreads() {
    if (!fiber_mode) {
        error = BARRIER_WITHOUT_FIBERS;
        return;
    }
    fibers[current].state = AT_BARRIER;
    to_scheduler();
}

extern "C" int harness_launch(Body b, void** args, unsigned gx, unsigned gy, unsigned gz,
                              unsigned bx, unsigned by, unsigned bz, int barriers) {
    unsigned threads = bx * by * bz;
    if (threads == 0 || threads > 1024 || gx == 0 || gy == 0 || gz == 0) return BAD_BLOCK;
    gridDim = dim3{gx, gy, gz};
    blockDim = dim3{bx, by, bz};
    body = b;
    body_args = args;
    fiber_mode = barriers != 0;
    error = OK;
    if (fiber_mode) ensure_fibers(threads);
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                blockIdx = uint3{x, y, z};
                if (fiber_mode) {
                    int rc = run_block_fibers(threads);
                    if (rc != OK) return rc;
                } else {
                    for (unsigned t = 0; t < threads; ++t) {
                        set_thread(t);
                        b(args);
                        if (error != OK) return error;
                    }
                }
            }
    return error;
}
