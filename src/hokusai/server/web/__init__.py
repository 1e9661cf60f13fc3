"""The browser side: sign-in with a key (sessions), and the Hokusai dashboard under /ui/."""
