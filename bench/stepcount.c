/* stepcount COMMAND...: runs COMMAND under ptrace and counts the instructions its main thread
 * executes between the SIGUSR1 and the SIGUSR2 it sends itself, by single-stepping (slow: ~20-40 us
 * per instruction; for 1e5-1e6 instructions). Prints "STEPS <n>" on stderr per pair of signals.
 * For code valgrind cannot run (AVX-512) on a machine without hardware counters (bench/callgrind_avg_act.py).
 * Only the traced thread is counted: the command must do the counted work on its main thread. */
#include <signal.h>
#include <stdio.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: stepcount COMMAND [ARGS...]\n");
    return 2;
  }
  pid_t pid = fork();
  if (pid == 0) {
    ptrace(PTRACE_TRACEME, 0, 0, 0);
    execvp(argv[1], argv + 1);
    perror("stepcount: exec");
    _exit(127);
  }
  int st, sig = 0, counting = 0;
  long steps = 0;
  waitpid(pid, &st, 0); /* the stop at exec */
  ptrace(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_EXITKILL);
  for (;;) {
    if (ptrace(counting ? PTRACE_SINGLESTEP : PTRACE_CONT, pid, 0, sig) < 0) {
      perror("stepcount: ptrace");
      return 1;
    }
    sig = 0;
    if (waitpid(pid, &st, 0) < 0) {
      perror("stepcount: waitpid");
      return 1;
    }
    if (WIFEXITED(st)) return WEXITSTATUS(st);
    if (WIFSIGNALED(st)) {
      fprintf(stderr, "stepcount: killed by signal %d\n", WTERMSIG(st));
      return 1;
    }
    const int s = WSTOPSIG(st);
    if (s == SIGTRAP) { /* a single step, or an exec: never passed on */
      steps += counting;
    } else if (s == SIGUSR1) {
      counting = 1;
      steps = 0;
    } else if (s == SIGUSR2) {
      counting = 0;
      fprintf(stderr, "STEPS %ld\n", steps);
    } else {
      sig = s; /* anything else goes to the program */
    }
  }
}
