"""The memory page: people look at what memory holds, search it and forget from it.

``page`` holds the routes (plain code over a request's method, target and headers; the
server writes the reply); ``memory.html``, ``memory.js`` and ``memory.css`` are the page
itself, served as they are, with no build step and nothing loaded from elsewhere.
"""
