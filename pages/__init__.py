"""The app's UI package: `ui/` holds what pages share (state and URL binding, widgets built from
method Configs, the model source, cached engine calls, shared sections); `views/` holds one script
per page, run by app.py's `st.navigation`. No page script sits directly in this folder, so
Streamlit's legacy file-based navigation has nothing to list.
"""
