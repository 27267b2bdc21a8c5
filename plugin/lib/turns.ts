/**
 * The user turns of each session, and the completion each one that did something ends
 * with. A prompt opens a turn; the assistant's messages of the turn share the prompt as
 * their parent. One that ends in tool calls is a step, whose tokens, start and text carry
 * over to the message that ends the turn; that one finishes the turn, with the prompt as
 * its task and the assistant's final text as its summary, if the turn changed a file or hit
 * an error. A turn that did neither (a question answered, say) is no task.
 */
import type { AssistantMessage, TextPart } from "@opencode-ai/sdk"
import { clip } from "./event-text.ts"
import type { Logger } from "./log.ts"
import { Memo } from "./memo.ts"

/** How many characters of the user's prompt name a completed task. */
const TASK_CHARS = 500
/** How many characters of the assistant's final answer go into a completion's summary. */
export const SUMMARY_CHARS = 8_000
/** How deep a chain of sub-agent sessions counts for its parents' turns. */
const MAX_DEPTH = 8

/** One user turn of a session: the prompt, then what the assistant did up to its answer. */
interface Turn {
  /** The prompt's message id (the `parentID` of the assistant's messages), once known. */
  userID?: string
  prompt?: string
  /** Tokens of the steps so far, and when the first began. */
  tokens: number
  started?: number
  /** Files written and errors hit during the turn. */
  changed: number
  failed: number
  /** The assistant's latest text in the turn (its answer, once the turn ends). */
  text: string
}

/** A turn that ended having changed a file or hit an error: what its completion says. */
export interface FinishedTurn {
  sessionID: string
  /** The prompt (clipped), or which model replied when the prompt was not seen. */
  task: string
  tokens: number
  durationMs: number
  /** The assistant's final text, clipped; empty when it wrote none. */
  summary: string
}

/** An assistant message seen: its text parts so far, by part id, until it is reported. */
interface Reply {
  parts: Map<string, string>
  reported: boolean
}

/**
 * The key of a session's turn whose prompt was not seen. Only the session's current turn
 * can be one, and nothing else finds it, so a new one simply takes the old one's place.
 */
function promptless(sessionID: string): string {
  return `${sessionID}\u0000`
}

function freshTurn(userID?: string, prompt?: string): Turn {
  return { userID, prompt, tokens: 0, changed: 0, failed: 0, text: "" }
}

export class Turns {
  /** Open turns by key (the prompt's message id), and each session's current turn key. */
  private readonly turns = new Memo<Turn>()
  private readonly current = new Memo<string>()
  /** The assistant messages seen, by message id. */
  private readonly assistants = new Memo<Reply>()
  /** The parent of each sub-agent session. */
  private readonly parents = new Memo<string>()

  constructor(private readonly log: Logger) {}

  /** A prompt opens a turn; its replies find it by their parentID, the prompt's id. */
  open(sessionID: string, messageID: string | undefined, prompt: string): void {
    const key = messageID ?? promptless(sessionID)
    this.turns.set(key, freshTurn(messageID, prompt || undefined))
    this.current.set(sessionID, key)
  }

  /** `sessionID` is a sub-agent session of `parentID`. */
  parent(sessionID: string, parentID: string): void {
    this.parents.set(sessionID, parentID)
  }

  /** Count a file written or an error in the session's turn, and in its parents' turns. */
  mark(sessionID: string, what: "changed" | "failed"): void {
    let session: string | undefined = sessionID
    for (let depth = 0; session && depth < MAX_DEPTH; depth++) {
      this.turnOf(session)[what]++
      session = this.parents.get(session)
    }
  }

  /** The session's memory was forgotten: the files and errors of its turn so far are no task. */
  forget(sessionID: string): void {
    Object.assign(this.turnOf(sessionID), { changed: 0, failed: 0 })
  }

  /** A text part of a message: kept for the assistant's answer. */
  textPart(part: TextPart): void {
    const reply = this.assistants.get(part.messageID)
    if (part.synthetic || part.ignored || !reply || reply.reported) return
    reply.parts.set(part.id, typeof part.text === "string" ? part.text : "")
  }

  /** An assistant message was updated; the turn it finishes, if it finishes one that did something. */
  reply(info: AssistantMessage): FinishedTurn | undefined {
    const reply = this.assistants.get(info.id) ?? { parts: new Map<string, string>(), reported: false }
    this.assistants.set(info.id, reply)
    const turn = this.turnOfReply(info)
    const finished = info.time?.completed
    if (!finished || reply.reported) return undefined
    reply.reported = true
    const text = messageText(reply.parts)
    reply.parts.clear()
    if (text) turn.text = text
    if (info.error) return undefined // reported by session.error
    const tokens = info.tokens as (AssistantMessage["tokens"] & { total?: number }) | undefined
    const used =
      typeof tokens?.total === "number"
        ? tokens.total
        : (tokens?.input ?? 0) + (tokens?.output ?? 0) + (tokens?.reasoning ?? 0)
    turn.tokens += Number.isFinite(used) ? Math.max(0, used) : 0
    turn.started = Math.min(turn.started ?? info.time.created, info.time.created)
    if (info.finish === "tool-calls" || info.finish === "tool_calls") return undefined
    const { changed, failed, tokens: total, started, text: answer } = turn
    // The turn is over; anything after this under the same prompt starts from nothing.
    Object.assign(turn, { tokens: 0, started: undefined, changed: 0, failed: 0, text: "" })
    if (!changed && !failed) {
      this.log(
        "debug",
        `turn ${info.parentID} of ${info.sessionID} changed nothing and hit no error: no completion`,
      )
      return undefined
    }
    return {
      sessionID: info.sessionID,
      task: turn.prompt
        ? clip(turn.prompt, TASK_CHARS)
        : `reply from ${info.providerID}/${info.modelID} in session ${info.sessionID}`,
      tokens: Math.round(total),
      durationMs: Math.max(0, finished - (started ?? finished)),
      summary: clip(answer, SUMMARY_CHARS),
    }
  }

  // -- internals ----------------------------------------------------------------------

  /** The session's current turn; one without a prompt if none is open. */
  private turnOf(sessionID: string): Turn {
    const key = this.current.get(sessionID)
    const turn = key === undefined ? undefined : this.turns.get(key)
    if (turn) return turn
    const fresh = freshTurn()
    const freshKey = promptless(sessionID)
    this.turns.set(freshKey, fresh)
    this.current.set(sessionID, freshKey)
    return fresh
  }

  /** The turn an assistant message belongs to (its parentID is the turn's prompt). */
  private turnOfReply(info: AssistantMessage): Turn {
    const key = this.current.get(info.sessionID)
    let turn = key === undefined ? undefined : this.turns.get(key)
    if (turn?.userID !== info.parentID) {
      if (turn && turn.userID === undefined && key !== undefined) {
        // Opened by a file or an error before the plugin saw this turn's prompt.
        this.turns.delete(key)
        turn.userID = info.parentID
      } else {
        turn = this.turns.get(info.parentID) ?? freshTurn(info.parentID)
      }
      this.turns.set(info.parentID, turn)
      this.current.set(info.sessionID, info.parentID)
    }
    return turn
  }
}

/** The text of an assistant message from its parts, in OpenCode's order (by part id). */
function messageText(parts: Map<string, string>): string {
  return [...parts.entries()]
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([, text]) => text.trim())
    .filter(Boolean)
    .join("\n")
}
