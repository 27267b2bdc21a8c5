/** How many turns, messages, tool calls and sessions the plugin remembers (oldest forgotten first). */
export const MEMO_SIZE = 1000

/** A Map that forgets its oldest entries past `limit` (setting a key again makes it newest). */
export class Memo<V> {
  private readonly map = new Map<string, V>()
  constructor(private readonly limit: number = MEMO_SIZE) {}
  get(key: string): V | undefined {
    return this.map.get(key)
  }
  has(key: string): boolean {
    return this.map.has(key)
  }
  delete(key: string): boolean {
    return this.map.delete(key)
  }
  set(key: string, value: V): void {
    this.map.delete(key)
    this.map.set(key, value)
    if (this.map.size > this.limit) this.map.delete(this.map.keys().next().value as string)
  }
  entries(): IterableIterator<[string, V]> {
    return this.map.entries()
  }
}
