"""Profile inference from a user's own posts (§3.3).

The paper infers age, gender, marital status, occupation and location of each SNS user with the
Markov-logic method of Hirano et al. (2013) on units of 150 posts, then takes a majority vote over
the units. Here:

- `split_into_units`: consecutive units of `unit_size` posts.
- `CUES`: the clause library. Each row is a weighted first-order clause family
  `Cue_c(unit) ⇒ Attr(unit, v)`: a regular expression over the unit's text (English and Japanese
  self-disclosure: "my wife", "I'm 23", "23歳です", "I live in Provo", ...) and a prior weight per value.
- `MarkovLogicInferrer`: per field, P(v | unit) ∝ exp(b_v + Σ_c w_{c,v} f_c(unit)), where
  f_c = log2(1 + number of matches of cue c in the unit).
- `majority_vote` and `infer_profiles`: per user, the vote over units; corpus profiles are kept.
- `LLMProfileInferrer`: zero-shot prompting of an instruct LLM behind the same `infer_unit`.
- `evaluate_inference`: coverage and accuracy against labelled users.

Prior weights. A value's weight is its log-odds against a value that no clause supports, so in a
field with K values one clause of weight w firing once gives P(v) = e^w / (e^w + K - 1), and a
clause firing n times counts log2(1 + n) times. With the default threshold 0.6, the priors are set so
that an explicit statement decides on its own ("I'm 23", "my wife", "I work as a nurse", "I live in
Provo": P >= 0.87), a near-explicit one mostly does ("I'm a sophomore", "my boyfriend"), and a
circumstantial one needs repeating ("my boss", "my professor", "my kids", a bare place name). The
weights per tier therefore grow with K; each block of CUES states its scale. They are priors:
`MarkovLogicInferrer.fit` re-estimates them from labelled users.
"""

from __future__ import annotations

import json
import math
import re
import re._constants as _sre
import re._parser as _sre_parse
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from udg_lib.progress import progress_bar
from udg_lib.data.schema import PROFILE_FIELDS, UNKNOWN, has_known_profile, profile_lookup, unknown_if_blank

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_THRESHOLD = 0.6  # below this probability a unit's value is unknown

UnitResult = dict[str, tuple[str, float]]  # field -> (value or "unknown", confidence)

# --- vocabulary ---------------------------------------------------------------------------------

# Places: region label -> name fragments (regular expressions). ASCII fragments are matched as whole
# words, case-insensitively unless wrapped in (?-i:...) (names that are also common words or first
# names); Japanese fragments as they stand. Japanese prefectures map to the regions of the paper's
# Table 1; Nagano and Niigata go with Hokuriku (Hokuriku-Shin'etsu), Yamanashi with Kanto (the
# capital region). Names that are also surnames or words (千葉, 山口, 大分 "considerably") need their
# prefecture or city suffix.
PLACES: dict[str, tuple[str, ...]] = {
    "Alabama": ("Alabama", "Huntsville", "Tuscaloosa"),
    "Alaska": ("Alaska", "Anchorage", "Fairbanks", "Juneau"),
    "Arizona": ("Arizona", "(?-i:Phoenix)", "Tucson", "Tempe", "Scottsdale", "Flagstaff"),
    "Arkansas": ("Arkansas", "Little Rock"),
    "California": ("California", "Cali", "Los Angeles", "L\\.A\\.", "(?-i:LA)", "San Francisco", "San Diego",
                   "San Jose", "Sacramento", "Pasadena", "Oakland", "Berkeley", "Hollywood", "Silicon Valley",
                   "Bay Area", "Orange County", "Malibu", "Santa Monica", "Irvine", "Anaheim", "Fresno",
                   "Long Beach", "Caltech", "UCLA", "Stanford"),
    "Colorado": ("Colorado", "Denver", "Boulder", "Fort Collins"),
    "Connecticut": ("Connecticut", "Hartford", "New Haven", "Stamford"),
    "Delaware": ("Delaware",),
    "District of Columbia": ("Washington,? D\\.?C\\.?", "(?-i:D\\.C\\.)"),
    "Florida": ("Florida", "Miami", "Orlando", "Tampa", "Jacksonville", "Tallahassee", "Boca", "Fort Lauderdale",
                "Key West"),
    "Georgia": ("(?-i:Georgia)", "Atlanta", "Savannah"),
    "Hawaii": ("Hawaii", "Honolulu", "Maui", "Oahu"),
    "Idaho": ("Idaho", "Boise", "Rexburg"),
    "Illinois": ("Illinois", "Chicago"),
    "Indiana": ("(?-i:Indiana)(?! Jones)", "Indianapolis"),
    "Iowa": ("Iowa", "Des Moines"),
    "Kansas": ("Kansas(?! City)", "Wichita", "Topeka"),
    "Kentucky": ("Kentucky", "Louisville"),
    "Louisiana": ("Louisiana", "New Orleans", "Baton Rouge"),
    "Maine": ("(?-i:Maine)",),
    "Maryland": ("Maryland", "Baltimore"),
    "Massachusetts": ("Massachusetts", "Boston", "Cape Cod"),
    "Michigan": ("Michigan", "Detroit", "Ann Arbor", "Grand Rapids"),
    "Minnesota": ("Minnesota", "Minneapolis"),
    "Mississippi": ("Mississippi",),
    "Missouri": ("Missouri", "St\\.? Louis", "Kansas City"),
    "Montana": ("(?-i:Montana)", "Bozeman", "Missoula"),
    "Nebraska": ("Nebraska", "Omaha"),
    "Nevada": ("Nevada", "Las Vegas", "Vegas", "(?-i:Reno)"),
    "New Hampshire": ("New Hampshire",),
    "New Jersey": ("New Jersey", "Jersey City", "Newark", "Hoboken", "Trenton", "Atlantic City", "Princeton"),
    "New Mexico": ("New Mexico", "Albuquerque", "Santa Fe"),
    "New York": ("New York", "NYC", "Manhattan", "Brooklyn", "(?-i:Queens)", "Bronx", "Staten Island",
                 "Long Island", "Harlem", "Upper West Side", "Upper East Side", "Albany", "NYU"),
    "North Carolina": ("North Carolina", "Raleigh", "Chapel Hill"),
    "North Dakota": ("North Dakota", "Fargo"),
    "Ohio": ("Ohio", "Cleveland", "Cincinnati", "Akron", "Dayton"),
    "Oklahoma": ("Oklahoma", "Tulsa"),
    "Oregon": ("Oregon", "Portland"),
    "Pennsylvania": ("Pennsylvania", "Philadelphia", "Philly", "Pittsburgh"),
    "Rhode Island": ("Rhode Island",),
    "South Carolina": ("South Carolina", "Charleston", "Myrtle Beach"),
    "South Dakota": ("South Dakota", "Sioux Falls"),
    "Tennessee": ("Tennessee", "Nashville", "Memphis", "Knoxville"),
    "Texas": ("Texas", "Houston", "Dallas", "(?-i:Austin)", "San Antonio", "El Paso", "Fort Worth", "Galveston"),
    "Utah": ("Utah", "Provo", "Orem", "Salt Lake", "SLC", "Ogden", "Lehi", "Park City", "Moab", "BYU"),
    "Vermont": ("Vermont", "Burlington"),
    "Virginia": ("(?<!West )Virginia", "Virginia Beach", "Norfolk"),
    "Washington": ("Washington State", "Seattle", "Spokane", "Tacoma"),
    "West Virginia": ("West Virginia",),
    "Wisconsin": ("Wisconsin", "Milwaukee"),
    "Wyoming": ("Wyoming", "Cheyenne", "Jackson Hole"),
    "Canada": ("Canada", "Toronto", "Vancouver", "Montreal", "Ottawa", "Calgary"),
    "Mexico": ("(?<!New )Mexico", "Guadalajara", "Cancun"),
    "United Kingdom": ("England", "London", "(?-i:UK)", "Britain", "Scotland", "Manchester", "Liverpool"),
    "Australia": ("Australia", "Melbourne"),
    "India": ("India", "New Delhi", "Delhi", "Mumbai", "Bombay", "Bangalore", "Bengaluru", "Chennai", "Kolkata",
              "Hyderabad"),
    # Japan, by the regions of the paper's Table 1
    "Kanto": ("Tokyo", "Yokohama", "Kanagawa", "Saitama", "Chiba", "Ibaraki", "Tochigi", "Gunma", "Kanto",
              "東京", "横浜", "神奈川", "埼玉", "千葉[県市]", "茨城", "栃木", "群馬", "関東", "川崎市", "山梨"),
    "Kinki": ("Osaka", "Kyoto", "Nara", "Hyogo", "Shiga", "Wakayama", "Kansai", "Kinki",
              "大阪", "(?<!東)京都", "神戸", "奈良", "兵庫", "滋賀", "和歌山", "関西", "近畿"),
    "Tokai": ("Nagoya", "Aichi", "Shizuoka", "Gifu", "Tokai", "名古屋", "愛知", "静岡", "岐阜", "三重県", "東海"),
    "Kyushu/Okinawa": ("Fukuoka", "Kyushu", "Okinawa", "Nagasaki", "Kumamoto", "Kagoshima", "Oita",
                       "福岡", "博多", "九州", "沖縄", "長崎[県市]", "熊本", "鹿児島", "大分県", "宮崎[県市]", "佐賀[県市]"),
    "Tohoku/Hokkaido": ("Hokkaido", "Sapporo", "Sendai", "Tohoku", "Aomori", "Iwate", "Miyagi",
                        "Yamagata", "Fukushima", "北海道", "札幌", "仙台", "東北", "青森", "岩手", "宮城県",
                        "秋田[県市]", "山形", "福島[県市]"),
    "Chugoku/Shikoku": ("Hiroshima", "Okayama", "Shikoku", "Chugoku", "Tottori", "Shimane", "Tokushima",
                        "Kagawa", "Ehime", "Kochi", "Matsuyama", "広島", "岡山", "四国", "中国地方", "鳥取",
                        "島根", "山口[県市]", "徳島", "香川県", "愛媛", "高知"),
    "Hokuriku": ("Niigata", "Toyama", "Kanazawa", "Ishikawa", "Fukui", "Nagano", "Hokuriku",
                 "新潟", "富山", "金沢", "石川県", "福井[県市]", "長野[県市]", "北陸"),
}

# Occupation nouns for "I'm a/an X", "I work as a/an X", "Xです" (and for reading an LLM's answer).
# English nouns are regular expressions matched as words; Japanese ones as they stand.
OCCUPATION_NOUNS: dict[str, tuple[str, ...]] = {
    "office_worker": ("office worker", "office assistant", "administrative assistant", "secretary",
                      "receptionist", "clerk", "salesman", "saleswoman", "salesperson", "sales rep", "editor",
                      "analyst", "consultant", "banker", "paralegal", "project manager", "account manager",
                      "company employee", "salaryman", "会社員", "サラリーマン", "事務職", "営業職"),
    "part_time_worker": ("part[- ]timer", "part[- ]time worker", "フリーター", "パート主婦"),
    "unemployed": ("unemployed", "jobless", "無職", "ニート"),
    "homemaker": ("homemaker", "housewife", "househusband", "stay[- ]at[- ]home (?:mom|mother|dad|father|parent|wife)",
                  "専業主婦", "主婦", "主夫"),
    "business_owner": ("business owner", "entrepreneur", "shop owner", "store owner", "restaurant owner",
                       "self[- ]employed", "CEO", "founder", "自営業", "経営者"),
    "civil_servant": ("civil servant", "government employee", "public servant", "mail carrier", "mailman",
                      "postman", "letter carrier", "postal worker", "police officer", "cop", "firefighter",
                      "公務員", "警察官", "消防士", "郵便局員"),
    "researcher": ("researcher", "scientist", "physicist", "astrophysicist", "chemist", "biologist", "astronomer",
                   "neuroscientist", "mathematician", "postdoc", "professor", "research assistant", "研究者", "研究員"),
    "engineer": ("engineer", "software developer", "web developer", "developer", "programmer", "coder",
                 "data scientist", "エンジニア", "プログラマー?", "技術者"),
    "entertainer": ("actor", "actress", "comedian", "entertainer", "俳優", "女優", "芸人", "タレント"),
    "professional": ("lawyer", "attorney", "doctor", "physician", "surgeon", "dentist", "nurse", "pharmacist",
                     "accountant", "therapist", "psychiatrist", "psychologist", "architect", "teacher",
                     "gynecologist", "veterinarian", "(?:airline )?pilot", "医師", "医者", "弁護士", "看護師", "教師", "教員", "薬剤師",
                     "税理士"),
    "service_worker": ("waiter", "waitress", "server", "bartender", "barista", "cashier", "mechanic", "chef",
                       "janitor", "cab driver", "taxi driver", "truck driver", "hairdresser", "hairstylist",
                       "housekeeper", "nanny", "店員", "販売員", "美容師", "調理師"),
    "college_student": ("college student", "university student", "grad student", "graduate student", "undergrad",
                        "undergraduate", "phd student"),
    "high_school_student": ("high school student", "high schooler"),
    "retired": ("retiree",),
}

AGE_BANDS: tuple[str, ...] = ("10s", "20s", "30s", "40s", "50s", "60s+")

VOCABULARY: dict[str, tuple[str, ...]] = {
    "age_band": AGE_BANDS,
    "gender": ("female", "male"),
    "marital": ("married", "single"),
    "occupation": ("office_worker", "college_student", "part_time_worker", "unemployed", "homemaker",
                   "business_owner", "high_school_student", "civil_servant", "researcher", "engineer",
                   "entertainer", "professional", "service_worker", "retired"),
    "region": tuple(PLACES),
}


# --- cue library ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cue:
    """One clause family `Cue(unit) ⇒ Attr(unit, v)` of `field`, with a prior weight per value (0 if absent)."""

    name: str  # unique within its field
    field: str
    pattern: str  # a regular expression, matched case-insensitively on NFKC-normalised text
    weights: Mapping[str, float]


I_AM = r"\bi(?:'m| am|m)\b"
# Word boundaries for ASCII names that also hold in Japanese text ("Tokyoに住んでいます"), and after
# a trailing dot ("L.A."), where \b would not.
_A, _Z = r"(?<![A-Za-z0-9])", r"(?![A-Za-z0-9])"
_NOT_A_UNIT = (r"(?![/:.,-]\d)(?!\s*(?:%|percent|minutes?|mins?|hours?|hrs?|seconds?|secs?|days?|weeks?|months?"
               r"|dollars?|bucks|cents?|grand|miles?|km|feet|foot|ft|inch(?:es)?|pounds?|lbs?|kg|times?|points?"
               r"|degrees?|pages?|people|credits?|calories|'s|th\b|st\b|nd\b|rd\b))")
_JA_ME = r"(?:私|僕|俺|わたし|あたし|自分|男|女|主婦|学生|会社員|OL)"
# age band -> (number pattern, decade words, Japanese decade)
_AGE_NUMBERS: dict[str, tuple[str, str, str]] = {
    "10s": ("1[3-9]", "teens", "10"),
    "20s": ("2\\d", "twenties|20'?s", "20"),
    "30s": ("3\\d", "thirties|30'?s", "30"),
    "40s": ("4\\d", "forties|40'?s", "40"),
    "50s": ("5\\d", "fifties|50'?s", "50"),
    "60s+": ("(?:[6-9]\\d|1[01]\\d)", "sixties|seventies|eighties|nineties|[6-9]0'?s", "[6-9]0"),
}
# Words before an occupation noun that make "I'm a X" no statement of one's job ("I'm a terrible
# singer", "I'm not a doctor", "I'm an aspiring actress").
_NOT_A_JOB = (r"(?:not|no|never|good|great|bad|terrible|horrible|awful|amazing|decent|better|worse|huge|big|little"
              r"|really|very|real|total|natural|born|such|kind|sort|like|wannabe|aspiring|former|ex|future|retired"
              r"|fan|fake|frustrated|failed|closet)")


def _stated_age(number: str, decade_words: str, decade: str) -> str:
    """'I'm 23', 'I am a 23-year-old', 'I just turned 23', 'in my twenties', '23歳です', '20代の私'."""
    return "|".join([
        rf"{I_AM} (?:only |now |almost |nearly |about |just )?{number}(?: years? old| yrs? old| y/?o)?\b{_NOT_A_UNIT}",
        rf"(?:{I_AM}|\bas) an? {number}[- ](?:year|yr)[- ]old\b",
        rf"(?<!when )(?<!since )\bi (?:just )?turned {number}\b",
        rf"(?<!was )\bin my (?:early |mid |mid-|late )?(?:{decade_words})\b",
        rf"(?<!\d){number}(?:歳|才)(?:です|だ(?!っ)|になりました|になった|になる|になります|の{_JA_ME})",
        rf"(?<!\d){decade}代(?:前半|半ば|後半)?(?:です|だ(?!っ)|の{_JA_ME})",
    ])


def _alternatives(names: Iterable[str], *, japanese: bool) -> str:
    """The English (ASCII) or the Japanese names, as one regex group; "" if there are none."""
    chosen = [n for n in names if n.isascii() != japanese]
    return "(?:" + "|".join(chosen) + ")" if chosen else ""


def _occupation_noun(nouns: Iterable[str]) -> str:
    """'I'm a (night-shift) X', 'I work as an X', 'my job as a X', '(私は)Xです', 'Xとして働いています'."""
    nouns = list(nouns)
    en, ja = _alternatives(nouns, japanese=False), _alternatives(nouns, japanese=True)
    modifiers = rf"(?:(?!{_NOT_A_JOB}\b)[\w-]+ ){{0,2}}"
    patterns = [
        rf"{I_AM} an? {modifiers}{en}\b(?!'s)",
        rf"\bi (?:work|'m working|am working) as (?:an? )?{modifiers}{en}\b",
        rf"\bmy (?:job|work) as (?:an? )?{modifiers}{en}\b",
    ] if en else []
    if ja:
        patterns.append(rf"{ja}(?:です|をしています|をしてます|をやっています|として働)")
    return "|".join(patterns)


def _place_names(region: str, *, japanese: bool) -> str:
    return _alternatives(PLACES[region], japanese=japanese)


def _mention_pattern(region: str) -> str:
    en, ja = _place_names(region, japanese=False), _place_names(region, japanese=True)
    return "|".join(([rf"{_A}{en}{_Z}"] if en else []) + ([ja] if ja else []))


def _place_cues(region: str) -> list[Cue]:
    """'I live in X', 'I'm from X' and a bare mention of X, in English and Japanese."""
    en, ja = _place_names(region, japanese=False), _place_names(region, japanese=True)
    area = r"(?:the |(?:north|south|east|west)(?:ern)? |upstate |downtown |central |rural )?"
    lives, origin = [], []
    if en:
        lives.append(rf"(?:\bi (?:currently |still |now )?(?:live|reside|moved|relocated)(?: back)? (?:in|to|near)"
                     rf"|{I_AM} (?:currently |still |now )?(?:living|based|staying) (?:in|near)|\bhere in"
                     rf"|\bwe (?:live|moved) (?:in|to)) {area}{en}{_Z}")
        origin.append(rf"(?:{I_AM} (?:originally )?from|\bi (?:grew up|was born|was raised) (?:in|near)"
                      rf"|\bborn and raised in|\bmy hometown is) {area}{en}{_Z}")
    if ja:
        suffix = "(?:都|府|県|市|区|町|村)?"
        lives.append(rf"{ja}{suffix}(?:に住|で暮ら|在住|に引っ越)")
        origin.append(rf"{ja}{suffix}(?:出身|生まれ|育ち)")
    return [
        Cue(f"lives_in:{region}", "region", "|".join(lives), {region: 6.0}),
        Cue(f"from:{region}", "region", "|".join(origin), {region: 4.0}),
        Cue(f"mentions:{region}", "region", _mention_pattern(region), {region: 1.5}),
    ]


# Patterns that more than one field uses.
MY_WIFE = r"\bmy (?:wife|wife's|wives)\b|(?<![夫稲お花])(?:妻|家内)(?:が|は|と|に|の|も|を)|(?:うちの|俺の|僕の)嫁"
MY_HUSBAND = (r"\bmy (?:husband|husband's|hubby)\b"
              r"|(?:(?<![丈工農漁])夫(?![婦妻])|(?<!ご)旦那|(?<!ご)主人(?!公))(?:が|は|と|に|の|も|を)")
MY_BOYFRIEND = r"\bmy (?:boyfriend|bf)\b|彼氏(?:が|は|と|に|の|も|を|いる|いない|できた|欲しい)"
MY_GIRLFRIEND = r"\bmy (?:girlfriend|gf)\b|(?:俺の|僕の)彼女|彼女(?:いる|いない|できた|欲しい|ができ|がいな|がほし)"
MY_KIDS = r"\bmy (?:kids|children|son|daughter|sons|daughters|toddler|newborn)\b|(?:うちの子|息子|娘)(?:が|は|と|に|も|を)"
GRANDKIDS = r"\bmy grand-?(?:kids?|children|child|sons?|daughters?|babies|baby)\b|孫(?!悟)(?:が|は|と|に|の|たち|達)"
HOMEMAKER = (r"\bstay[- ]at[- ]home (?:mom|mother|dad|father|parent|wife)\b|\bhousewife\b|\bhomemaker\b"
             r"|専業主婦|主婦(?:です|だ|なの|の)|主夫")
RETIRED = (rf"(?:{I_AM}(?: an?)?|\bi've been|\bsince i|\bnow that i) retired\b|\bmy retirement\b|\bi retired\b"
           r"|定年(?:退職)?(?:し|した|後|になり)|年金(?:生活|暮らし)|退職しました")
STUDENT = rf"{I_AM} (?:a |an )?(?:full[- ]time )?student\b|(?<![中小])学生(?:です|だ|なん)"
HIGH_SCHOOL = (rf"{I_AM} (?:a )?(?:freshman|sophomore|junior|senior) in high school\b"
               rf"|{I_AM} in (?:high school|(?:9th|10th|11th|12th|ninth|tenth|eleventh|twelfth) grade)\b"
               r"|高校生(?:です|だ|なん|だけど|の(?:私|僕|俺|わたし))|高[123](?:です|だ|なん|の(?:私|僕|俺))")
MIDDLE_SCHOOL = (rf"{I_AM} in (?:middle school|junior high|(?:7th|8th|seventh|eighth) grade)\b"
                 r"|中学生(?:です|だ|なん|の(?:私|僕|俺|わたし))|中[123](?:です|だ|なん)")
HS_LIFE = r"\bmy (?:homework|principal|high school teacher)\b|\bmy (?:mom|dad|parents) (?:won't|wont) let me\b"
COLLEGE_YEAR = (rf"{I_AM} (?:a |an )?(?:college |university )?(?:freshman|sophomore|junior|senior)\b"
                r"(?! in high| at \w+ high| high| (?:developer|engineer|analyst|citizen|associate|manager|partner))"
                r"|大学生(?:です|だ|なん|の(?:私|僕|俺|わたし))|大学[1-4]年|大学院生|院生です")
COLLEGE_LIFE = (r"\bmy (?:major|minor|professors?|dorm|classes|gpa|semester|finals|advisor|scholarship)\b"
                r"|\bon campus\b|\bthis semester\b|\bmajoring in\b|\bi(?:'m| am|m) (?:an? )?\w+ major\b"
                r"|ゼミ|就活|卒論|履修|サークル")
MISSION = r"\b(?:on|from|after|before) my mission\b|\bmy mission (?:president|companion)\b|\bwhen i served\b"

SELF_FEMALE = (rf"{I_AM} (?:an? )?(?:(?:single|young|old|married|working|pregnant|divorced) )?(?:woman|girl|lady|mom|"
               rf"mother|mama|wife|housewife|waitress|actress|female)\b|\bas a (?:woman|girl|mom|mother|female)\b"
               rf"|{I_AM} pregnant\b|\bmy pregnancy\b")
SELF_MALE = (rf"{I_AM} (?:an? )?(?:(?:single|young|old|married|working|divorced) )?(?:man|guy|dude|boy|dad|father|"
             r"husband|male|gentleman)\b|\bas a (?:man|guy|dad|father|male)\b|\bmy (?:beard|mustache|moustache)\b")
JA_MALE_SPEECH = r"(?:俺|僕|オレ|ボク)(?:は|が|の|も|って|に|を|と|だ)"  # masculine first-person pronouns
JA_FEMALE_SPEECH = r"あたし(?:は|が|の|も)|(?:かしら|だわ|わよ|のよね)(?:[。!?\s]|$)"  # and sentence endings
MARRIED = (rf"{I_AM} (?:happily |still )?married\b|\bi got married\b|\bwe(?:'re| are) married\b"
           r"|\b(?:i've|i have|we've|we have) been married\b|\bmy (?:in-laws|(?:mother|father)[- ]in[- ]law)\b"
           r"|\bour wedding anniversary\b|既婚|結婚して(?:ます|います|いる|る)|結婚\d+年")
SINGLE = (rf"{I_AM} (?:still |currently |totally |very |so )?(?:single|unmarried)\b|{I_AM} not married\b"
          r"|\b(?:i've|i have|i'm|i am) never (?:been )?married\b|独身|独り身|婚活|合コン|恋人(?:が)?いない")
DIVORCED = rf"\bmy ex-?(?:wife|husband)\b|{I_AM} divorced\b|\bi got divorced\b|離婚(?:した|して|歴)"
DATING = rf"\bmy (?:fianc[eé]e?|ex)\b|\b(?:a|first|blind) date (?:with|tonight|last night)\b|{I_AM} dating\b"

WORKPLACE = (r"\bmy (?:boss|coworkers?|co-workers?|supervisor|cubicle)\b|\bat the office\b|\bat work today\b"
             r"|会社員|サラリーマン|(?<![A-Za-z])OL(?![A-Za-z])|上司|残業|出社|職場|同僚")
PART_TIME = r"\bmy part[- ]time job\b|\bi work part[- ]time\b|(?<![ガロラ])バイト|(?<![アデ])パート(?:で|を|が|に|の|先)"
SERVICE = r"\bmy (?:shift|shifts|customers|tips)\b|接客|シフト|店長"
OWNER = (r"\bi (?:own|run|started) (?:a|an|my own) (?:\w+ )?(?:business|company|store|shop|restaurant|startup|firm)\b"
         rf"|\bmy (?:own business|own company|startup|employees)\b|{I_AM} self[- ]employed\b|自営業|経営して|起業した")
CIVIL = (r"\bi work (?:for|at) the (?:government|city|state|county|post office|postal service)\b|\bthe post office\b"
         r"|\bmy (?:mail )?route\b|公務員|市役所|県庁|役所")
RESEARCH = (r"\bmy (?:research|lab|laboratory|experiments?|grant|postdoc|findings|publications?)\b"
            r"|\bthe (?:physics|chemistry|biology) department\b|\bpeer[- ]review|研究室|論文|研究(?:して|者)|学会")
ENGINEERING = r"\bdebugging\b|\bthe codebase\b|\bcode reviews?\b|\bpull requests?\b|エンジニア|プログラマ|コーディング|開発(?:して|を担当)"
SHOWBIZ = (r"\bmy (?:act|audience|agent|audition|gig|fans|material|routine)\b|\bon stage\b|\bstand-?up\b"
           r"|舞台|オーディション|芸人")
CLIENTS = r"\bmy (?:patients?|clients?|practice|caseload)\b|患者さん|クライアント|(?:弁護士|医師|医者|看護師)(?:です|をして|として)"
UNEMPLOYED = (rf"{I_AM} (?:currently |still )?(?:unemployed|jobless|out of work|between jobs"
              r"|looking for (?:a )?(?:job|work))\b"
              r"|\bi (?:just )?(?:lost my job|got fired|got laid off)\b|無職|ニート|失業|求職中")

CUES: list[Cue] = [
    # age_band (K = 6): 5 explicit, 3-4 near-explicit, about 1.2 circumstantial
    *[Cue(f"stated_age:{band}", "age_band", _stated_age(*numbers), {band: 5.0})
      for band, numbers in _AGE_NUMBERS.items()],
    Cue("grandkids", "age_band", GRANDKIDS, {"60s+": 3.0, "50s": 1.5}),
    Cue("retired", "age_band", RETIRED, {"60s+": 3.0, "50s": 1.0}),
    Cue("high_school", "age_band", HIGH_SCHOOL, {"10s": 4.0}),
    Cue("middle_school", "age_band", MIDDLE_SCHOOL, {"10s": 4.0}),
    Cue("hs_life", "age_band", HS_LIFE, {"10s": 1.2}),
    Cue("college_year", "age_band", COLLEGE_YEAR, {"20s": 3.0, "10s": 1.0}),
    Cue("college_life", "age_band", COLLEGE_LIFE, {"20s": 1.2, "10s": 0.3}),
    Cue("mission", "age_band", MISSION, {"20s": 1.5}),  # Latter-day Saint missions are served at 18-21 (BYU chat)
    Cue("my_kids", "age_band", MY_KIDS, {"30s": 0.6, "40s": 0.6, "50s": 0.3}),
    Cue("around_30", "age_band", "アラサー", {"30s": 2.0, "20s": 1.5}),
    Cue("around_40", "age_band", "アラフォー", {"40s": 2.0, "30s": 1.5}),
    # gender (K = 2): 3 explicit, 1-2 near-explicit; partner cues assume the heterosexual base rate
    Cue("self_female", "gender", SELF_FEMALE, {"female": 3.0}),
    Cue("self_male", "gender", SELF_MALE, {"male": 3.0}),
    Cue("my_wife", "gender", MY_WIFE, {"male": 3.0}),
    Cue("my_husband", "gender", MY_HUSBAND, {"female": 3.0}),
    Cue("my_ex_wife", "gender", r"\bmy ex-?wife\b", {"male": 3.0}),
    Cue("my_ex_husband", "gender", r"\bmy ex-?husband\b", {"female": 3.0}),
    Cue("my_boyfriend", "gender", MY_BOYFRIEND, {"female": 1.5}),
    Cue("my_girlfriend", "gender", MY_GIRLFRIEND, {"male": 1.0}),  # women say it of friends too
    Cue("ja_male_speech", "gender", JA_MALE_SPEECH, {"male": 1.5}),
    Cue("ja_female_speech", "gender", JA_FEMALE_SPEECH, {"female": 1.0}),
    Cue("homemaker", "gender", HOMEMAKER, {"female": 1.0}),
    Cue("mission", "gender", MISSION, {"male": 0.3}),  # most missionaries are young men
    # marital (K = 2): 3 explicit, 1-2 near-explicit, 0.4 circumstantial (decides from about 3 matches)
    Cue("married", "marital", MARRIED, {"married": 3.0}),
    Cue("single", "marital", SINGLE, {"single": 3.0}),
    Cue("my_wife", "marital", MY_WIFE, {"married": 3.0}),
    Cue("my_husband", "marital", MY_HUSBAND, {"married": 3.0}),
    Cue("divorced", "marital", DIVORCED, {"single": 1.5}),
    Cue("my_boyfriend", "marital", MY_BOYFRIEND, {"single": 1.5}),
    Cue("my_girlfriend", "marital", MY_GIRLFRIEND, {"single": 1.5}),
    Cue("dating", "marital", DATING, {"single": 1.0}),
    Cue("homemaker", "marital", HOMEMAKER, {"married": 1.5}),
    Cue("my_kids", "marital", MY_KIDS, {"married": 0.4}),
    Cue("grandkids", "marital", GRANDKIDS, {"married": 0.4}),
    Cue("student", "marital", f"{STUDENT}|{HIGH_SCHOOL}|{COLLEGE_YEAR}", {"single": 0.4}),
    # occupation (K = 14): 5 explicit ("I'm a nurse"), 3-4 near-explicit, 1.5-2 circumstantial
    *[Cue(f"noun:{occupation}", "occupation", _occupation_noun(nouns), {occupation: 5.0})
      for occupation, nouns in OCCUPATION_NOUNS.items()],
    Cue("performer", "occupation", _occupation_noun(("singer", "dancer", "musician", "performer")),
        {"entertainer": 2.5}),  # as often a hobby as a job: one statement is not enough
    Cue("student", "occupation", STUDENT, {"college_student": 3.5, "high_school_student": 1.5}),
    Cue("high_school", "occupation", HIGH_SCHOOL, {"high_school_student": 5.0}),
    Cue("hs_life", "occupation", HS_LIFE, {"high_school_student": 1.5}),
    Cue("college_year", "occupation", COLLEGE_YEAR, {"college_student": 4.0}),
    Cue("college_life", "occupation", COLLEGE_LIFE, {"college_student": 2.0}),
    Cue("unemployed", "occupation", UNEMPLOYED, {"unemployed": 4.0}),
    Cue("homemaker", "occupation", HOMEMAKER, {"homemaker": 4.0}),
    Cue("retired", "occupation", RETIRED, {"retired": 4.0}),
    Cue("owner", "occupation", OWNER, {"business_owner": 4.0}),
    Cue("part_time", "occupation", PART_TIME, {"part_time_worker": 3.2, "college_student": 0.5}),
    Cue("workplace", "occupation", WORKPLACE, {"office_worker": 1.5, "part_time_worker": 0.5,
                                                "service_worker": 0.5, "engineer": 0.5}),
    Cue("service", "occupation", SERVICE, {"service_worker": 1.5, "part_time_worker": 1.0}),
    Cue("civil", "occupation", CIVIL, {"civil_servant": 2.0}),
    Cue("research", "occupation", RESEARCH, {"researcher": 2.0, "college_student": 0.5}),
    Cue("engineering", "occupation", ENGINEERING, {"engineer": 2.0}),
    Cue("showbiz", "occupation", SHOWBIZ, {"entertainer": 2.0}),
    Cue("clients", "occupation", CLIENTS, {"professional": 2.0, "business_owner": 0.5}),
    # region (K = 63): 6 "I live in X", 4 "I'm from X", 1.5 a bare mention (decides from about 8)
    *[cue for region in PLACES for cue in _place_cues(region)],
]


def normalize_text(text: str) -> str:
    """NFKC (full-width digits and letters to ASCII) and straight apostrophes."""
    return unicodedata.normalize("NFKC", text).replace("\u2019", "'").replace("\u2018", "'")


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


_REGION_MENTIONS: dict[str, re.Pattern[str]] = {region: _compile(_mention_pattern(region)) for region in PLACES}


def region_of(text: str) -> str:
    """The region a free-text place names ("Pasadena, CA" -> California, "大阪" -> Kinki): the region
    label itself, else the one region its place names belong to; unknown if none or several."""
    text = normalize_text(text).strip()
    labels = {region.lower(): region for region in PLACES}
    if text.lower() in labels:
        return labels[text.lower()]
    regions = {region for region, regex in _REGION_MENTIONS.items() if regex.search(text)}
    return regions.pop() if len(regions) == 1 else UNKNOWN


# --- a literal prefilter: most cues cannot match most units ------------------------------------------
# Scanning every unit with each of the ~250 cue expressions was all of stage 01's time (5.5 min for 2,300
# speakers). Each expression is parsed once into literals one of which every match must contain
# (`required_literals`); a unit whose lowercased text holds none of them has no match, and only the rest are
# scanned. The counts are those of the plain scan.

# The non-ASCII characters that `re.IGNORECASE` matches to an ASCII letter but `str.lower` does not map to it
# (found by brute force over Unicode; a test repeats the search): folded before the literal check.
_FOLD_TO_ASCII = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"})
_REPEATS = (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT)
_ZERO_WIDTH = (_sre.AT, _sre.ASSERT, _sre.ASSERT_NOT)  # the match stays contiguous across them
_MAX_STRINGS = 256  # a finite set of strings larger than this is not spelled out


def _lower_char(code: int) -> str | None:
    """The character as lowered text holds it; None for a non-ASCII cased one (its case folds vary)."""
    char = chr(code).lower()
    return char if len(char) == 1 and (char.isascii() or char.upper() == char) else None


def _product(left: set[str], right: set[str]) -> set[str] | None:
    return {a + b for a in left for b in right} if len(left) * len(right) <= _MAX_STRINGS else None


def _strings(items) -> set[str] | None:
    """Every string (lowercase) the parsed sequence can match, if they are few; else None."""
    strings: set[str] | None = {""}
    for op, av in items:
        if op in _ZERO_WIDTH:
            continue
        if op is _sre.LITERAL:
            char = _lower_char(av)
            part = None if char is None else {char}
        elif op is _sre.IN:
            chars: set[str] = set()
            for kind, value in av:
                low, high = (value, value) if kind is _sre.LITERAL else value if kind is _sre.RANGE else (1, 0)
                if kind not in (_sre.LITERAL, _sre.RANGE) or high - low > 10:
                    return None
                chars |= {_lower_char(code) for code in range(low, high + 1)}
            part = None if None in chars else chars
        elif op is _sre.BRANCH:
            branches = [_strings(branch) for branch in av[1]]
            part = None if any(b is None for b in branches) else set().union(*branches)
        elif op is _sre.SUBPATTERN:
            part = _strings(av[3])
        elif op in _REPEATS and av[1] <= 2:
            body = _strings(av[2])
            part = None if body is None else set()
            for count in range(av[0], av[1] + 1):
                repeated: set[str] | None = {""}
                for _ in range(count):
                    repeated = None if repeated is None or body is None else _product(repeated, body)
                part = None if part is None or repeated is None else part | repeated
        else:
            part = None
        strings = None if part is None else _product(strings, part)
        if strings is None:
            return None
    return strings


def _selectivity(strings: frozenset[str]) -> tuple[int, int, int]:
    """Rank of a required set: literals of 4+ letters (a non-ASCII character counts 2) rarely occur by
    chance; among those, the fewest checks."""
    shortest = min(sum(1 if c.isascii() else 2 for c in string) for string in strings)
    return min(shortest, 4), -len(strings), shortest


def _stretch_candidates(parts: list[set[str]]) -> list[frozenset[str]]:
    """Each run of consecutive parts of a stretch, spelled out: every match contains one of its strings."""
    found = []
    for first in range(len(parts)):
        strings: set[str] | None = {""}
        for part in parts[first:]:
            strings = _product(strings, part)
            if strings is None:
                break
            if "" not in strings:
                found.append(frozenset(strings))
    return found


def _branch_required(branches) -> frozenset[str] | None:
    """A match of an alternation contains what one of its branches requires."""
    required = [_required_in(branch) for branch in branches]
    return None if any(r is None for r in required) else frozenset().union(*required)


def _required_in(items) -> frozenset[str] | None:
    """Strings (lowercase) one of which any match of the parsed sequence `items` contains; None if there are
    none. Candidates: runs of its stretches of finitely many strings, and its parts' own required sets."""
    candidates: list[frozenset[str]] = []
    stretch: list[set[str]] = []
    for op, av in items:
        if op in _ZERO_WIDTH:
            continue
        part = _strings([(op, av)])
        if part is not None:
            stretch.append(part)
            if op in (_sre.BRANCH, _sre.SUBPATTERN) and len(part) > 1:  # a few strings inside may do as well
                inner = _branch_required(av[1]) if op is _sre.BRANCH else _required_in(av[3])
                candidates += [inner] if inner else []
            continue
        candidates += _stretch_candidates(stretch)  # an unbounded or large part ends the stretch
        stretch = []
        found = None
        if op is _sre.BRANCH:
            found = _branch_required(av[1])
        elif op is _sre.SUBPATTERN:
            found = _required_in(av[3])
        elif op is _sre.ATOMIC_GROUP:
            found = _required_in(av)
        elif op in _REPEATS and av[0] >= 1:
            found = _required_in(av[2])
        if found:  # classes and optional parts require nothing
            candidates.append(found)
    candidates += _stretch_candidates(stretch)
    return max(candidates, key=_selectivity) if candidates else None


def required_literals(pattern: str) -> frozenset[str] | None:
    """Lowercase strings one of which the lowercased text (`prefilter_text`) holds wherever `pattern`
    (compiled with re.IGNORECASE) matches; None when the pattern requires no literal."""
    return _required_in(_sre_parse.parse(pattern, re.IGNORECASE))


def prefilter_text(text: str) -> str:
    """`text` lowercased for `required_literals` checks."""
    return text.translate(_FOLD_TO_ASCII).lower()


# --- units and the Markov-logic inferrer -------------------------------------------------------------

def split_into_units(posts: Sequence[str], unit_size: int) -> list[list[str]]:
    """§3.3: consecutive units of `unit_size` posts.

    A trailing unit shorter than half a unit joins the previous one; fewer posts than one unit make
    one unit; no posts make none.
    """
    if unit_size < 1:
        raise ValueError(f"unit_size must be positive, got {unit_size}")
    units = [list(posts[start:start + unit_size]) for start in range(0, len(posts), unit_size)]
    if len(units) > 1 and 2 * len(units[-1]) < unit_size:
        units[-2].extend(units.pop())
    return units


@dataclass
class FieldModel:
    """The log-linear model of one field: P(v | unit) ∝ exp(bias[v] + weights[v] · f(unit))."""

    values: tuple[str, ...]
    features: tuple[str, ...]  # cue names, the columns of `weights`
    weights: np.ndarray  # (len(values), len(features))
    bias: np.ndarray  # (len(values),)

    def probabilities(self, f: np.ndarray) -> np.ndarray:
        logits = self.bias + self.weights @ f
        exp = np.exp(logits - logits.max())
        return exp / exp.sum()

    def to_dict(self) -> dict:
        return {"values": list(self.values), "features": list(self.features),
                "weights": self.weights.tolist(), "bias": self.bias.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping) -> FieldModel:
        values, features = tuple(data["values"]), tuple(data["features"])
        weights = np.asarray(data["weights"], dtype=float).reshape(len(values), len(features))
        return cls(values, features, weights, np.asarray(data["bias"], dtype=float))


def prior_field_model(field_name: str, cues: Sequence[Cue]) -> FieldModel:
    """The documented prior: clause weights from the cue table, zero biases."""
    values = VOCABULARY[field_name]
    rows = [c for c in cues if c.field == field_name]
    weights = np.array([[c.weights.get(v, 0.0) for c in rows] for v in values], dtype=float)
    weights = weights.reshape(len(values), len(rows))  # (K, 0) for a field without cues
    return FieldModel(values, tuple(c.name for c in rows), weights, np.zeros(len(values)))


class MarkovLogicInferrer:
    """§3.3, after Hirano et al. (2013): profile inference with a Markov logic network (Richardson &
    Domingos, 2006) whose formulas are the weighted clauses `Cue_c(unit) ⇒ Attr(unit, v)` of `cues`.

    Every clause links one observed cue to one query atom of the same unit, and each field's values
    are mutually exclusive, so the network factorises per unit and field, and exact MLN inference is
    the softmax P(v | unit) ∝ exp(b_v + Σ_c w_{c,v} f_c(unit)) with f_c = log2(1 + matches of c).
    For the same reason, weight learning by (pseudo-)likelihood is multinomial logistic regression,
    which `fit` runs. A field is `unknown` when none of its cues fires or its most probable value is
    below the threshold.
    """

    def __init__(self, cues: Sequence[Cue] = CUES, models: Mapping[str, FieldModel] | None = None):
        self.cues = list(cues)
        keys = [(c.field, c.name) for c in self.cues]
        if len(set(keys)) != len(keys):
            raise ValueError("cue names must be unique within a field")
        if models is None:
            models = {f: prior_field_model(f, self.cues) for f in PROFILE_FIELDS}
        self.models = dict(models)
        self._regex = {c.pattern: _compile(c.pattern) for c in self.cues}  # shared patterns are counted once
        self._literals = {pattern: required_literals(pattern) for pattern in self._regex}

    def features(self, posts: Sequence[str]) -> dict[str, np.ndarray]:
        """Per field, f_c(unit) = log2(1 + matches) for the field model's cues, in its feature order.
        Only the cues whose required literals occur in the unit are scanned (the counts are the same)."""
        text = normalize_text("\n".join(posts))
        lowered = prefilter_text(text)
        seen: dict[str, bool] = {}  # cues share literals (the 63 regions' "I live in")

        def occurs(literal: str) -> bool:
            if literal not in seen:
                seen[literal] = literal in lowered
            return seen[literal]

        counts = {pattern: 0 if literals is not None and not any(map(occurs, literals))
                  else sum(1 for _ in self._regex[pattern].finditer(text))
                  for pattern, literals in self._literals.items()}
        by_name = {(c.field, c.name): counts[c.pattern] for c in self.cues}
        return {f: np.log2(1.0 + np.array([by_name[(f, name)] for name in model.features], dtype=float))
                for f, model in self.models.items()}

    def infer_unit(self, posts: Sequence[str], threshold: float = DEFAULT_THRESHOLD) -> UnitResult:
        """Per field: (most probable value, its probability), or (unknown, p) below the threshold
        and (unknown, 0.0) when no cue fired."""
        result: UnitResult = {}
        for field_name, f in self.features(posts).items():
            if not f.any():
                result[field_name] = (UNKNOWN, 0.0)
                continue
            p = self.models[field_name].probabilities(f)
            best = int(p.argmax())
            value = self.models[field_name].values[best] if p[best] >= threshold else UNKNOWN
            result[field_name] = (value, float(p[best]))
        return result

    def fit(self, units: Sequence[Sequence[str]], labels: Sequence[Mapping[str, str]],
            l2: float = 1.0) -> MarkovLogicInferrer:
        """Re-estimate each field's weights by L2-regularised multinomial logistic regression on the
        units whose label is known (C = 1 / l2).

        The fitted field predicts only the values seen among its labels (maximum likelihood gives the
        others no mass). Clauses that never fire on the training units keep their prior weights; a field
        with fewer than two labelled values, or none of whose clauses fire, keeps its prior model.
        """
        if len(units) != len(labels):
            raise ValueError(f"{len(units)} units but {len(labels)} labels")
        features = [self.features(u) for u in units]
        for field_name, prior in list(self.models.items()):
            rows = [i for i, lab in enumerate(labels) if unknown_if_blank(lab.get(field_name)) != UNKNOWN]
            y = np.array([str(labels[i][field_name]) for i in rows])
            if len(set(y)) < 2:
                continue
            x = np.stack([features[i][field_name] for i in rows])
            active = x.any(axis=0)
            if not active.any():
                continue
            classifier = LogisticRegression(C=1.0 / l2, max_iter=2000).fit(x[:, active], y)
            values = tuple(str(v) for v in classifier.classes_)
            coef, intercept = classifier.coef_, classifier.intercept_
            if len(values) == 2:  # sklearn's binary model scores the second class against the first
                coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
            prior_rows = [prior.values.index(v) if v in prior.values else None for v in values]
            weights = np.array([prior.weights[r] if r is not None else np.zeros(len(prior.features))
                                for r in prior_rows])
            weights[:, active] = coef
            self.models[field_name] = FieldModel(values, prior.features, weights, intercept.astype(float))
        return self

    def to_dict(self) -> dict:
        return {"cues": [{**asdict(c), "weights": dict(c.weights)} for c in self.cues],
                "models": {f: m.to_dict() for f, m in self.models.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> MarkovLogicInferrer:
        cues = [Cue(**c) for c in data["cues"]]
        return cls(cues, {f: FieldModel.from_dict(m) for f, m in data["models"].items()})


# --- votes over units, and whole corpora ---------------------------------------------------------------

def majority_vote(unit_results: Sequence[UnitResult]) -> dict[str, tuple[str, float]]:
    """§3.3: per field, the value most units voted for; unknown votes are ignored, ties go to the
    larger summed confidence. Returns (value, votes for it / units with a known vote)."""
    voted: dict[str, tuple[str, float]] = {}
    for field_name in PROFILE_FIELDS:
        votes: dict[str, list[float]] = {}
        for result in unit_results:
            value, confidence = result.get(field_name, (UNKNOWN, 0.0))
            if value != UNKNOWN:
                votes.setdefault(value, []).append(confidence)
        if not votes:
            voted[field_name] = (UNKNOWN, 0.0)
            continue
        winner = max(votes, key=lambda v: (len(votes[v]), sum(votes[v])))
        voted[field_name] = (winner, len(votes[winner]) / sum(len(c) for c in votes.values()))
    return voted


class UnitInferrer(Protocol):
    """What `infer_profiles` needs: MarkovLogicInferrer and LLMProfileInferrer have it."""

    def infer_unit(self, posts: Sequence[str], threshold: float = DEFAULT_THRESHOLD) -> UnitResult: ...


@dataclass(frozen=True)
class Voting:
    """How §3.3 turns a user's posts into a profile: units of `unit_size` posts, one inference per unit whose
    field values count when their confidence reaches `threshold`, a majority vote per field. `max_units` votes
    over a seeded sample (`seed`) of each user's units (for a slow inferrer such as the LLM one); None: all."""

    unit_size: int
    threshold: float
    max_units: int | None = None
    seed: int = 0


def infer_profiles(turns: pd.DataFrame, users: pd.DataFrame, inferrer: UnitInferrer, voting: Voting, *,
                   only_missing: bool = True, user_ids: Iterable[str] | None = None,
                   progress: bool = True) -> pd.DataFrame:
    """§3.3 for a corpus: each user's posts (their turns' texts, in the order of `turns`) in units,
    one inference per unit, a majority vote per field.

    Columns: user_id, n_posts, n_units, then per field `<field>` (the profile to use),
    `<field>_inferred` (the vote), `<field>_confidence` (the winner's vote share) and `<field>_source`:
    "corpus" where the users table has a known value and `only_missing` (the value is kept),
    otherwise "inferred" or "unknown". `voting` says how units are cut, sampled and counted.
    """
    unit_size, threshold, max_units = voting.unit_size, voting.threshold, voting.max_units
    posts_by_user = turns.groupby("speaker_id", sort=False)["text"].agg(list).to_dict()
    table = users.set_index("user_id")
    ids = list(table.index) if user_ids is None else [str(u) for u in user_ids]
    rng = np.random.default_rng(voting.seed)
    rows = []
    for user_id in progress_bar(ids, desc="profiles", disable=not progress):
        posts = posts_by_user.get(user_id, [])
        units = split_into_units(posts, unit_size)
        if max_units is not None and len(units) > max_units:
            units = [units[i] for i in sorted(rng.choice(len(units), size=max_units, replace=False))]
        voted = majority_vote([inferrer.infer_unit(unit, threshold=threshold) for unit in units])
        row: dict[str, object] = {"user_id": user_id, "n_posts": len(posts), "n_units": len(units)}
        for field_name in PROFILE_FIELDS:
            inferred, confidence = voted[field_name]
            given = unknown_if_blank(table.at[user_id, field_name]) if user_id in table.index else UNKNOWN
            if only_missing and given != UNKNOWN:
                value, source = given, "corpus"
            else:
                value, source = inferred, ("inferred" if inferred != UNKNOWN else UNKNOWN)
            row.update({field_name: value, f"{field_name}_inferred": inferred,
                        f"{field_name}_confidence": confidence, f"{field_name}_source": source})
        rows.append(row)
    columns = ["user_id", "n_posts", "n_units", *[f"{f}{s}" for f in PROFILE_FIELDS
                                                 for s in ("", "_inferred", "_confidence", "_source")]]
    return pd.DataFrame(rows, columns=columns)


def evaluate_inference(predicted: pd.DataFrame, gold: pd.DataFrame,
                       train_gold: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per field, over users whose gold value is known (n_labelled):

    coverage (share with a non-unknown prediction), accuracy (on the covered), accuracy_all (an
    unknown prediction counts as wrong), and the majority-class baseline: the most frequent known
    value of `train_gold` (or of `gold` when not given) and its accuracy on the labelled users.
    Predictions are read from `<field>_inferred` where present (an `infer_profiles` frame), else `<field>`.
    """
    reference = gold if train_gold is None else train_gold
    rows = []
    for f in PROFILE_FIELDS:
        pred_column = f"{f}_inferred" if f"{f}_inferred" in predicted else f
        merged = gold[["user_id", f]].merge(predicted[["user_id", pred_column]], on="user_id", how="inner",
                                            suffixes=("_gold", "_pred"))
        truth = merged.iloc[:, 1].map(unknown_if_blank)
        guess = merged.iloc[:, 2].map(unknown_if_blank)
        labelled = truth != UNKNOWN
        covered = labelled & (guess != UNKNOWN)
        correct = covered & (guess == truth)
        known_reference = reference[f].map(unknown_if_blank)
        known_reference = known_reference[known_reference != UNKNOWN]
        majority = known_reference.value_counts().index[0] if len(known_reference) else UNKNOWN
        n_labelled, n_covered = int(labelled.sum()), int(covered.sum())
        rows.append({
            "field": f, "n_labelled": n_labelled, "n_covered": n_covered,
            "coverage": n_covered / n_labelled if n_labelled else math.nan,
            "accuracy": int(correct.sum()) / n_covered if n_covered else math.nan,
            "accuracy_all": int(correct.sum()) / n_labelled if n_labelled else math.nan,
            "majority_value": majority,
            "majority_accuracy": float((truth[labelled] == majority).mean()) if n_labelled else math.nan,
        })
    return pd.DataFrame(rows)


# --- zero-shot LLM inferrer ------------------------------------------------------------------------------

_FIELD_DESCRIPTIONS: dict[str, str] = {
    "age_band": "age band, one of " + ", ".join(AGE_BANDS),
    "gender": "one of female, male",
    "marital": "one of married, single",
    "occupation": "one of " + ", ".join(VOCABULARY["occupation"]),
    "region": "where the person lives: a US state, a country, or a Japanese region such as Kanto or Kinki",
}
_GENDER_WORDS = {"female": r"\b(?:female|woman|women|girl|lady|f)\b|女", "male": r"\b(?:male|man|men|boy|guy|m)\b|男"}
_SINGLE_WORDS = r"\b(?:single|unmarried|not married|never married|divorced|widowed|dating)\b|独身|未婚"
_MARRIED_WORDS = r"\b(?:married|wife|husband|spouse)\b|既婚"
_AGE_WORDS = {"10s": "teen", "20s": "twent", "30s": "thirt", "40s": "fort", "50s": "fift",
              "60s+": "sixt|sevent|eight|ninet|senior|elderly|old age"}


def _one_or_unknown(found: Iterable[str]) -> str:
    """An answer that names two or more values (an echoed list of options) says nothing."""
    values = set(found)
    return values.pop() if len(values) == 1 else UNKNOWN


def _age_band_of(text: str) -> str:
    numbers = [int(n) for n in re.findall(r"\d+", text) if 10 <= int(n) < 120]
    if numbers:
        return _one_or_unknown(AGE_BANDS[min(n // 10, 6) - 1] for n in numbers)
    return _one_or_unknown(band for band, stem in _AGE_WORDS.items() if re.search(stem, text))


def _occupation_of(text: str) -> str:
    words = text.replace("_", " ").replace("-", " ")
    exact = [value for value in VOCABULARY["occupation"] if words == value.replace("_", " ")]
    if exact:
        return exact[0]
    found = []
    for value, nouns in OCCUPATION_NOUNS.items():
        en, ja = _alternatives(nouns, japanese=False), _alternatives(nouns, japanese=True)
        if _compile("|".join(([rf"\b{en}\b"] if en else []) + ([ja] if ja else []))).search(words):
            found.append(value)
    if not found and "student" in words:
        found.append("college_student")
    return _one_or_unknown(found)


def normalize_profile_value(field_name: str, raw: object) -> str:
    """A free-text answer mapped to the field's vocabulary ("Woman" -> female, "20-29" -> 20s,
    "Pasadena" -> California); an answer naming no value, or several, -> unknown."""
    text = normalize_text(str(raw)).strip().lower()
    if not text or text in (UNKNOWN, "none", "n/a", "null", "not stated", "not specified"):
        return UNKNOWN
    if field_name == "age_band":
        return _age_band_of(text)
    if field_name == "gender":
        return _one_or_unknown(value for value, words in _GENDER_WORDS.items() if re.search(words, text))
    if field_name == "marital":
        affirmed = re.sub(r"\b(?:not|never) married\b", "", text)  # "not married" is no "married"
        return _one_or_unknown([v for v, words in (("single", _SINGLE_WORDS), ("married", _MARRIED_WORDS))
                                if re.search(words, affirmed if v == "married" else text)])
    if field_name == "occupation":
        return _occupation_of(text)
    if field_name == "region":
        return region_of(str(raw))
    raise ValueError(f"unknown profile field {field_name!r}")


def parse_profile_reply(reply: str) -> dict[str, str]:
    """The five fields from an LLM reply: the first {...} block read as JSON or, failing that (or
    without braces), loose `key: value` pairs, the first of repeated keys winning; keys
    case-insensitive; values mapped to the vocabulary."""
    block = re.search(r"\{.*?\}", reply, re.DOTALL)
    text = block.group() if block else reply
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError:
        loaded = None
    if isinstance(loaded, dict):
        pairs = list(loaded.items())
    else:
        found = re.findall(r"[\"']?([A-Za-z_ ]+)[\"']?\s*:\s*(?:\"([^\"\n]*)\"|'([^'\n]*)'|([^,}\n]*))", text)
        pairs = [(key, "".join(values)) for key, *values in found]
    by_key: dict[str, object] = {}
    for key, value in pairs:
        by_key.setdefault(re.sub(r"[\s-]+", "_", str(key).strip().lower()), value)
    aliases = {"age_band": ("age_band", "age"), "gender": ("gender", "sex"), "marital": ("marital", "marital_status"),
               "occupation": ("occupation", "job"), "region": ("region", "location", "residence")}
    parsed = {}
    for field_name in PROFILE_FIELDS:
        value = next((by_key[k] for k in aliases[field_name] if k in by_key), UNKNOWN)
        parsed[field_name] = normalize_profile_value(field_name, value)
    return parsed


class LLMProfileInferrer:
    """Zero-shot profile inference by an instruct LLM, behind the same `infer_unit` as
    MarkovLogicInferrer.

    `generate` maps chat messages to the reply text (tests pass fakes). With a `reply_prefix` (by
    default the opening of the JSON answer, which keeps small models to the format), the messages end
    with that partial assistant message, `generate` returns its continuation, and the prefix plus the
    continuation is parsed.
    """

    def __init__(self, generate: Callable[[list[dict]], str], *, max_posts: int = 20, char_budget: int = 1500,
                 max_post_chars: int = 300, reply_prefix: str = '{"age_band": "'):
        self.generate = generate
        self.max_posts = max_posts  # the first posts of the unit that go into the prompt
        self.char_budget = char_budget  # ... up to this many characters in all
        self.max_post_chars = max_post_chars  # each post cut to this length
        self.reply_prefix = reply_prefix

    @classmethod
    def from_model(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int = 64,
                   **kwargs) -> LLMProfileInferrer:
        """Greedy decoding with the tokenizer's chat template (see `udg_lib.llm.load_causal_lm`)."""
        from udg_lib.llm import generate_chat  # torch and transformers only when an LLM is used

        return cls(lambda messages: generate_chat(model, tokenizer, messages, max_new_tokens=max_new_tokens), **kwargs)

    def build_messages(self, posts: Sequence[str]) -> list[dict]:
        lines, used = [], 0
        for post in posts[:self.max_posts]:
            line = "- " + " ".join(post.split())[:self.max_post_chars]
            if lines and used + len(line) > self.char_budget:
                break
            lines.append(line)
            used += len(line) + 1
        keys = "\n".join(f'"{f}": {_FIELD_DESCRIPTIONS[f]}' for f in PROFILE_FIELDS)
        instruction = ("Posts written by one person:\n" + "\n".join(lines) + "\n\nWhat can you tell about the person "
                       "who wrote them? Answer with one JSON object with these keys:\n" + keys +
                       '\nUse "unknown" for anything the posts do not say.')
        messages = [{"role": "system", "content": "You infer facts about people from their posts. You answer in JSON."},
                    {"role": "user", "content": instruction}]
        if self.reply_prefix:
            messages.append({"role": "assistant", "content": self.reply_prefix})
        return messages

    def infer_unit(self, posts: Sequence[str], threshold: float = DEFAULT_THRESHOLD) -> UnitResult:
        """Per field: (parsed value, 1.0) for a value in the vocabulary, else (unknown, 0.0)."""
        parsed = parse_profile_reply(self.reply_prefix + self.generate(self.build_messages(posts)))
        confidence = 1.0  # a parsed answer counts as certain
        return {f: (v, confidence) if v != UNKNOWN and confidence >= threshold else (UNKNOWN, 0.0)
                for f, v in parsed.items()}


# ---------------------------------------------------------------------------------------------------------------
# Stage 01 helpers: labelled users, held-out split, Table 1


def labelled_user_ids(users: pd.DataFrame) -> list[str]:
    """Users with at least one known profile field."""
    return sorted(users.loc[has_known_profile(users), "user_id"].astype(str))


def split_labelled_users(user_ids: Sequence[str], heldout_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(fit, held-out) labelled users: a seeded random share is held out from weight fitting."""
    order = np.random.default_rng(seed).permutation(sorted(user_ids)).tolist()
    n_heldout = max(1, round(heldout_fraction * len(order)))
    return sorted(order[n_heldout:]), sorted(order[:n_heldout])


def labelled_units(turns: pd.DataFrame, users: pd.DataFrame, user_ids: Iterable[str],
                   unit_size: int) -> tuple[list[list[str]], list[dict[str, str]]]:
    """Training data for `MarkovLogicInferrer.fit`: each labelled user's units, each with the user's profile."""
    posts_by_user = turns.groupby("speaker_id", sort=False)["text"].agg(list).to_dict()
    profiles = profile_lookup(users)
    units, labels = [], []
    for user_id in user_ids:
        for unit in split_into_units(posts_by_user.get(user_id, []), unit_size):
            units.append(unit)
            labels.append({f: unknown_if_blank(profiles[user_id][f]) for f in PROFILE_FIELDS})
    return units, labels


def profile_counts(users: pd.DataFrame) -> pd.DataFrame:
    """Table 1 analog: users per attribute value, unknown excluded, most frequent first per field."""
    rows = []
    for field_name in PROFILE_FIELDS:
        counts = users[field_name].map(unknown_if_blank).value_counts()
        rows += [{"attribute": field_name, "value": value, "users": int(n)}
                 for value, n in counts.items() if value != UNKNOWN]
    return pd.DataFrame(rows, columns=["attribute", "value", "users"])


def users_to_infer(users: pd.DataFrame, keep: Iterable[str], max_users: int, seed: int = 0) -> list[str] | None:
    """Which users `infer_profiles` reads: all (None) when `max_users` is 0, else the users in `keep`
    (stage 01: the evaluation users and every speaker of a pre-training pair, whose PSP prompts show the
    profile) plus a seeded sample of `max_users` others (users seen only as partners), for quick runs."""
    if not max_users:
        return None
    keep = set(keep)
    others = sorted(set(users["user_id"]) - keep)
    rng = np.random.default_rng(seed)
    sample = rng.choice(others, size=min(max_users, len(others)), replace=False).tolist() if others else []
    return sorted(keep | set(sample))


def labels_from_personas(users: pd.DataFrame, inferrer: UnitInferrer,
                         threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """Fill unknown profile fields from each user's persona sentences (PersonaChat-style corpora).

    The persona is read as one unit by `inferrer`. As for PCJP in the paper (§4.2.1), this gives
    profiles inferred "from the persona information", and labelled users for fitting the weights.
    """
    filled = users.copy()
    for index, row in users.iterrows():
        persona = list(row.get("persona", []) if row.get("persona") is not None else [])
        if not persona:
            continue
        reading = inferrer.infer_unit(persona, threshold=threshold)
        for field_name in PROFILE_FIELDS:
            if unknown_if_blank(row[field_name]) == UNKNOWN:
                filled.at[index, field_name] = reading[field_name][0]
    return filled


def infer_across_corpora(corpora: Mapping[str, object], user_ids: Mapping[str, Sequence[str]],
                         inferrer: UnitInferrer, voting: Voting) -> pd.DataFrame:
    """`infer_profiles` (raw inference, `only_missing=False`) for the named users of several corpora,
    with ids namespaced as `corpus/user`; `corpora` maps names to Corpus objects."""
    frames = [
        infer_profiles(corpora[name].turns, corpora[name].users, inferrer, voting, only_missing=False, user_ids=ids,
                       progress=False)
        .assign(user_id=lambda frame, name=name: name + "/" + frame["user_id"])
        for name, ids in user_ids.items()
    ]
    return pd.concat(frames, ignore_index=True)


def users_across_corpora(corpora: Mapping[str, object], user_ids: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """The users tables rows of the named users, ids namespaced as `corpus/user` (gold labels for scoring)."""
    frames = [corpora[name].users[corpora[name].users["user_id"].isin(set(ids))]
              .assign(user_id=lambda frame, name=name: name + "/" + frame["user_id"])
              for name, ids in user_ids.items()]
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------------------------------------
# Profiles without test information (§3.3 applied per split set)


def fill_profiles(users: pd.DataFrame, inferred: pd.DataFrame) -> pd.DataFrame:
    """`users` with the profile fields of `inferred` (an `infer_profiles` table) for the users it covers; every
    other user keeps the corpus' own values (blank -> unknown), so supplied profiles are never dropped."""
    table = inferred.set_index("user_id")
    filled = users.copy()
    for field_name in PROFILE_FIELDS:
        own = filled[field_name].map(unknown_if_blank)
        filled[field_name] = [table.at[u, field_name] if u in table.index else v
                              for u, v in zip(filled["user_id"], own)]
    return filled


def turns_outside_heldout(turns: pd.DataFrame, heldout: pd.DataFrame) -> pd.DataFrame:
    """`turns` without each user's own turns in their held-out dialogues (`heldout`: user_id, dialogue_id)."""
    if heldout.empty:
        return turns
    hidden = pd.MultiIndex.from_frame(heldout[["user_id", "dialogue_id"]].astype(str))
    keys = pd.MultiIndex.from_arrays([turns["speaker_id"].astype(str), turns["dialogue_id"].astype(str)])
    return turns[~keys.isin(hidden)]


def profiles_by_split_set(turns: pd.DataFrame, users: pd.DataFrame, inferrer: UnitInferrer,
                          heldout: pd.DataFrame, voting: Voting, *,
                          user_ids: Iterable[str] | None = None, progress: bool = True
                          ) -> tuple[pd.DataFrame, pd.DataFrame, dict[int, pd.DataFrame]]:
    """Users tables whose inferred profiles never read a dev/test turn (§3.3, §4.2.1).

    `heldout` (stage 00's heldout_dialogues: split_set, user_id, dialogue_id) lists each evaluation user's
    dev/test dialogues per set. Returns (inference, base, by_set):
    - `base`: every user; an evaluation user's profile is inferred without their dev/test dialogues of *any*
      set (safe for pre-training and Table 1);
    - `by_set[k]`: `base` with each evaluation user's profile inferred again from all their turns outside
      set k's dev/test dialogues (more data, still nothing that set scores). PSP/PPP prompts of set k, speaker
      and partner alike, use this table;
    - `inference`: the `infer_profiles` table behind `base`.
    Corpus-supplied values are kept for every user (`fill_profiles`); inference fills only what is missing.
    `user_ids` limits inference to those users (evaluation users are always added).
    """
    evaluation = sorted(set(heldout["user_id"].astype(str)))
    ids = None if user_ids is None else sorted(set(map(str, user_ids)) | set(evaluation))
    inference = infer_profiles(turns_outside_heldout(turns, heldout), users, inferrer, voting, user_ids=ids,
                               progress=progress)
    base = fill_profiles(users, inference)
    by_set = {}
    for split_set, hidden in heldout.groupby("split_set", sort=True):
        per_set = infer_profiles(turns_outside_heldout(turns, hidden), users, inferrer, voting, user_ids=evaluation,
                                 progress=False)
        by_set[int(split_set)] = fill_profiles(base, per_set)
    return inference, base, by_set
