"""lmlab's ELIZA script: a Rogerian "doctor" in the spirit of Weizenbaum's DOCTOR (1966), written anew.

Shape of the data (read by lmlab/models/eliza/session.py):
  * `PRE`: words rewritten before matching (contractions spelled out);
  * `REFLECT`: the pronoun swaps applied to a captured fragment before it is echoed back;
  * `SYNONYMS`: word classes a pattern names with `@class`;
  * `KEYWORDS`: keyword -> (rank, rules). A rule is (pattern, replies). A pattern is words, `*` (any
    run of words, maybe none) and `@class` (one word of the class). In a reply, (n) is the n-th
    `*`/`@` capture, reflected. A reply "goto KEY" continues with KEY's rules. A rule whose pattern
    starts with "$" also saves its reply for later (Weizenbaum's MEMORY), used when nothing matches;
  * `NONE`: replies when no keyword occurs and nothing is remembered.
Replies of a rule are used in turn, as in the original.
"""

GREETING = "How do you do. Please tell me your problem."
GOODBYE = "Goodbye. Thank you for talking to me."
QUIT = ("bye", "goodbye", "quit", "exit")

PRE = {
    "dont": "don't", "cant": "can't", "wont": "won't", "im": "i am", "recollect": "remember",
    "i'm": "i am", "you're": "you are", "i've": "i have", "you've": "you have", "i'll": "i will",
    "you'll": "you will", "i'd": "i would", "you'd": "you would", "isn't": "is not", "aren't": "are not",
    "maybe": "perhaps", "certainly": "yes", "machine": "computer", "machines": "computer",
    "computers": "computer", "same": "alike", "identical": "alike", "equivalent": "alike",
}

REFLECT = {
    "i": "you", "me": "you", "my": "your", "mine": "yours", "myself": "yourself", "am": "are",
    "you": "I", "your": "my", "yours": "mine", "yourself": "myself", "are": "am",
    "was": "were", "we": "you", "us": "you", "our": "your", "ours": "yours",
}

SYNONYMS = {
    "family": ["mother", "mom", "father", "dad", "sister", "brother", "wife", "husband", "children",
               "child", "son", "daughter", "family", "parents"],
    "sad": ["sad", "unhappy", "depressed", "sick", "miserable", "lonely", "tired"],
    "happy": ["happy", "glad", "better", "elated", "cheerful"],
    "desire": ["want", "need", "wish", "crave"],
    "belief": ["feel", "think", "believe", "suspect"],
    "everyone": ["everyone", "everybody", "nobody", "noone"],
}

KEYWORDS = {
    "sorry": (0, [("*", ["Please don't apologise.", "Apologies are not necessary.",
                         "What feelings do you have when you apologise?"])]),
    "remember": (5, [
        ("* i remember *", ["Do you often think of (2)?", "Does thinking of (2) bring anything else to mind?",
                            "Why do you remember (2) just now?"]),
        ("* do you remember *", ["Did you think I would forget (2)?", "What about (2)?"]),
        ("*", ["goto what"])]),
    "if": (3, [("* if *", ["Do you think it is likely that (2)?", "Do you wish that (2)?",
                           "What do you think about (2)?"])]),
    "dreamed": (4, [("* i dreamed *", ["Really, (2)?", "Have you ever fantasised (2) while you were awake?"])]),
    "dream": (3, [("*", ["What does that dream suggest to you?", "Do you dream often?",
                         "What persons appear in your dreams?"])]),
    "perhaps": (0, [("*", ["You don't seem quite certain.", "Why the uncertain tone?",
                           "Can't you be more positive?"])]),
    "computer": (50, [("*", ["Do computers worry you?", "Why do you mention computers?",
                             "What do you think machines have to do with your problem?"])]),
    "name": (15, [("*", ["I am not interested in names.", "Names don't interest me. Please continue."])]),
    "hello": (0, [("*", ["How do you do. Please state your problem.", "Hello. What is on your mind?"])]),
    "am": (1, [
        ("* am i *", ["Do you believe you are (2)?", "Would you want to be (2)?", "goto what"]),
        ("* i am @sad *", ["I am sorry to hear that you are (2).", "Do you think coming here will help you "
                           "not to be (2)?", "Can you explain what made you (2)?"]),
        ("* i am @happy *", ["How have I helped you to be (2)?", "What makes you (2) just now?"]),
        ("* i am *", ["Why do you think you are (2)?", "How long have you been (2)?",
                      "Do you believe it is normal to be (2)?", "Do you enjoy being (2)?"]),
        ("*", ["Why do you say 'am'?", "I don't understand that."])]),
    "are": (1, [
        ("* are you *", ["Why are you interested in whether I am (2) or not?", "Would you prefer if I "
                         "weren't (2)?", "Perhaps I am (2) in your fantasies."]),
        ("* you are *", ["What makes you think I am (2)?", "Does it please you to believe I am (2)?"]),
        ("* are *", ["Did you think they might not be (2)?", "Possibly they are (2)."])]),
    "your": (0, [("* your *", ["Why are you concerned over my (2)?", "What about your own (2)?"])]),
    "was": (2, [
        ("* was i *", ["What if you were (2)?", "Do you think you were (2)?"]),
        ("* i was *", ["Were you really?", "Why do you tell me you were (2) now?"]),
        ("* was you *", ["Would you like to believe I was (2)?", "Perhaps I was (2)."])]),
    "i": (0, [
        ("* i @desire *", ["What would it mean to you if you got (3)?", "Why do you (2) (3)?",
                           "Suppose you got (3) soon."]),
        ("* i @belief *", ["Do you really think so?", "But you are not sure you (3)?"]),
        ("* i can't *", ["How do you know that you can't (2)?", "Have you tried?",
                         "Perhaps you could (2) now."]),
        ("* i don't *", ["Don't you really (2)?", "Why don't you (2)?", "Does that trouble you?"]),
        ("* i feel *", ["Tell me more about such feelings.", "Do you often feel (2)?"]),
        ("* i * you *", ["Perhaps in your fantasies we (2) each other.", "Do you wish to (2) me?",
                         "You seem to need to (2) me."]),
        ("*", ["You say (1)?", "Can you elaborate on that?", "Do you say (1) for some special reason?"])]),
    "you": (0, [
        ("* you remind me of *", ["goto alike"]),
        ("* you * me *", ["What makes you think I (2) you?", "Does it please you to think I (2) you?",
                          "Suppose I did (2) you. What would that mean?"]),
        ("* you *", ["We were discussing you, not me.", "Oh, I (2)?", "You're not really talking about me, "
                     "are you?"])]),
    "yes": (0, [("*", ["You seem to be quite positive.", "You are sure.", "I see.", "I understand."])]),
    "no": (0, [("*", ["Are you saying no just to be negative?", "You are being a bit negative.", "Why not?"])]),
    "my": (2, [
        ("$ * my *", ["Earlier you mentioned your (2).", "Does that have anything to do with your (2)?",
                      "Let's discuss further your (2)."]),
        ("* my * @family *", ["Tell me more about your family.", "Who else in your family (4)?",
                              "Your (3)?"]),
        ("* my *", ["Your (2)?", "Why do you say your (2)?", "Is it important to you that your (2)?"])]),
    "can": (0, [
        ("* can you *", ["You believe I can (2), don't you?", "goto what", "You want me to be able to (2)."]),
        ("* can i *", ["Whether or not you can (2) depends on you more than on me.", "goto what"])]),
    "what": (0, [("*", ["Why do you ask?", "Does that question interest you?", "What is it you really want "
                        "to know?", "What comes to your mind when you ask that?"])]),
    "because": (0, [("*", ["Is that the real reason?", "Don't any other reasons come to mind?",
                           "What other reasons might there be?"])]),
    "why": (0, [
        ("* why don't you *", ["Do you believe I don't (2)?", "Perhaps I will (2) in good time."]),
        ("* why can't i *", ["Do you think you should be able to (2)?", "Why can't you (2)?"]),
        ("*", ["goto what"])]),
    "everyone": (2, [("* @everyone *", ["Really, (2)?", "Surely not (2).", "Can you think of anyone in "
                                        "particular?", "Who, for example?"])]),
    "always": (1, [("*", ["Can you think of a specific example?", "When?", "Really, always?"])]),
    "alike": (10, [("*", ["In what way?", "What resemblance do you see?",
                          "What other connections do you see?"])]),
    "like": (10, [("* @be * like *", ["goto alike"])]),
    "different": (0, [("*", ["How is it different?", "What differences do you see?"])]),
}
SYNONYMS["be"] = ["am", "is", "are", "was"]

NONE = ["Please go on.", "I'm not sure I understand you fully.", "What does that suggest to you?",
        "Do you feel strongly about discussing such things?", "That is interesting. Please continue."]
