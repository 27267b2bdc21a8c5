/**
 * Waiting for what happens elsewhere: a signal wakes whoever waits for it, every wait is
 * bounded, and no timer keeps OpenCode's process alive.
 */

/** Waiters for one kind of occurrence (the socket opened, the queue drained, …). */
export class Signal {
  private readonly waiters = new Set<() => void>()

  /** Wake everyone waiting now; later waits wait for the next occurrence. */
  wake(): void {
    const waiting = [...this.waiters]
    this.waiters.clear()
    for (const wake of waiting) wake()
  }

  /** Call `wake` at the next occurrence; the returned function cancels that. */
  listen(wake: () => void): () => void {
    this.waiters.add(wake)
    return () => this.waiters.delete(wake)
  }
}

/** Wait until any of the signals is woken, or `timeoutMs` passed. */
export async function waitFor(signals: readonly Signal[], timeoutMs: number): Promise<void> {
  await new Promise<void>((resolve) => {
    const done = (): void => {
      clearTimeout(timer)
      for (const cancel of cancels) cancel()
      resolve()
    }
    const timer = setTimeout(done, Math.max(0, timeoutMs))
    const cancels = signals.map((signal) => signal.listen(done))
  })
}

/** Let the process exit while `timer` is pending (a reconnect or a heartbeat never keeps it). */
export function unref(timer: ReturnType<typeof setTimeout>): void {
  ;(timer as { unref?: () => void }).unref?.()
}
