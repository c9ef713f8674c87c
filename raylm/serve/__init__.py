"""Serving: `engine` (continuous batching, plain torch, no Ray) and `app` (Ray Serve + FastAPI,
the OpenAI API). This package imports neither, so `import raylm.serve.engine` never pulls in Ray."""
