/**
 * Which memory each session's chat carries, and where it goes in a model request.
 *
 * A session asks the bridge for memory with its first prompt (and again with the first
 * prompt after OpenCode compacted it); the context it gets is the session's memory. It is
 * never stored in the session: `experimental.chat.messages.transform`, which OpenCode runs
 * on the messages of each chat request and of each compaction request (not of title
 * requests), adds it to the chat requests as a synthetic user message of its own, right
 * after the first user message of the part of the session the request holds (after a
 * compaction: the first one after the compaction marker). So the model reads it once per
 * request at a fixed place; a title request (the history up to the first prompt) never
 * holds it, even if the title is being made while the chat asks; and a compaction request
 * is left without it (`experimental.session.compacting` announces one), so no summary
 * carries it into the rest of the session. After the compaction the chat requests carry it
 * again.
 */
import type { Message, Part, TextPart } from "@opencode-ai/sdk"
import { Memo } from "./memo.ts"

/** A message with its parts, as OpenCode hands them to the messages transform. */
export type WithParts = { info: Message; parts: Part[] }

interface Entry {
  /** The context, or null when the bridge had nothing for the session. */
  text: string | null
  /** Compacted since: the next prompt asks again (the context stays until an answer). */
  stale: boolean
}

export class SessionMemory {
  private readonly contexts = new Memo<Entry>()
  /** Sessions whose compaction request comes next. */
  private readonly compacting = new Memo<true>()

  /** Whether a prompt of the session should ask for memory (its first, or first after a compaction). */
  wanted(sessionID: string): boolean {
    return this.contexts.get(sessionID)?.stale ?? true
  }

  /** The bridge's answer for the session: its context, or null for none. */
  remember(sessionID: string, text: string | null): void {
    const known = this.contexts.get(sessionID)
    // An empty answer after a compaction keeps what the session had.
    this.contexts.set(sessionID, { text: text ?? (known?.stale ? known.text : null), stale: false })
  }

  /** The session's memory (undefined when there is none). */
  context(sessionID: string): string | undefined {
    return this.contexts.get(sessionID)?.text ?? undefined
  }

  /** OpenCode is about to compact the session: its next messages transform is the compaction's. */
  compactionStarts(sessionID: string): void {
    this.compacting.set(sessionID, true)
  }

  /** OpenCode compacted the session: the next prompt asks for memory again. */
  compacted(sessionID: string): void {
    this.compacting.delete(sessionID)
    const known = this.contexts.get(sessionID)
    if (known) known.stale = true
  }

  /**
   * Add the session's memory to the messages of a model request, in place; nothing for a
   * compaction request. Returns the message added, if any.
   */
  inject(messages: WithParts[]): WithParts | undefined {
    const sessionID = messages.find((m) => typeof m?.info?.sessionID === "string")?.info.sessionID
    if (sessionID === undefined) return undefined
    if (this.compacting.delete(sessionID)) return undefined
    const text = this.context(sessionID)
    if (!text) return undefined
    const at = messages.findIndex(
      (m) => m.info.role === "user" && !m.parts.some((part) => part.type === "compaction"),
    )
    const anchor = messages[at]
    if (!anchor || anchor.info.role !== "user") return undefined
    const id = `${anchor.info.id}-memory`
    const part: TextPart = { id: `${id}-0`, sessionID, messageID: id, type: "text", text, synthetic: true }
    const added: WithParts = { info: { ...anchor.info, id }, parts: [part] }
    messages.splice(at + 1, 0, added)
    return added
  }
}
